"""Fixtures shared by the end-to-end tests.

One simulation SuperLink serves every e2e test that only submits runs to it: each run has its
own run id and output folder, so runs do not see each other, and starting a SuperLink per test
module cost seconds each time. Tests that must stop or crash a SuperLink (resume, Ctrl-C, the
sweep's own) still start their own.

The README's command runs the tests on two pytest-xdist workers (`-n 2`; pyproject.toml adds
`--dist load --maxschedchunk 1`: tests go to the workers one at a time, as they finish). Each
worker is a process with session and module fixtures of its own (its own SuperLink, temporary
folders and child processes), so tests that must share a fixture's processes are one test. The
e2e tests are collected first: each is a Flower run that mostly waits (start-up, polling), so
one worker's runs overlap the other's runs and CPU-bound unit tests, and no long run starts last.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedbat_tools.localrun import LocalSuperLink, descendants, is_alive


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The e2e tests first, each group in its collected order."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second intra-op thread only spins (~30x slower).
    Modules of such tests use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's Message needs the run it belongs to (set by the runtime in a real run)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture(scope="session")
def superlink() -> Iterator[LocalSuperLink]:
    """A simulation SuperLink for the whole test run; afterwards nothing of it may run."""
    link = LocalSuperLink()
    link.start()
    assert link.process is not None
    try:
        yield link
    finally:
        tree = [link.process.pid, *descendants(link.process.pid)]
        link.stop()
    assert not [pid for pid in tree if is_alive(pid)], "the SuperLink left processes behind"

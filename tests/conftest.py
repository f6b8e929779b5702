"""Fixtures shared by the end-to-end tests.

One simulation SuperLink serves every e2e test that only submits runs to it: each run has its
own run id and output folder, so runs do not see each other, and starting a SuperLink per test
module cost seconds each time. Tests that must stop or crash a SuperLink (resume, Ctrl-C, the
sweep's own) still start their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedbat_tools.localrun import LocalSuperLink, descendants, is_alive


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

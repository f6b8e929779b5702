"""examples/quickstart: Flower's PyTorch quickstart shape (task / client_app / server_app) on
the installed library, with one strategy line and one train call changed; its own bundle; and
one real run through Flower's simulation runtime."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbat_tools.fab import fab_contents
from fedbat_tools.localrun import APP_DIR, LocalSuperLink

QUICKSTART = APP_DIR / "examples" / "quickstart"
FILES = ("task.py", "client_app.py", "server_app.py")
ROUNDS = 2
# 240 train examples a node, batch 16, 2 epochs: 30 local steps a round, well above chance
# (0.1) after two rounds.
RUN_CONFIG = {
    "num-server-rounds": ROUNDS,
    "fraction-train": 1.0,
    "local-epochs": 2,
    "batch-size": 16,
    "max-examples-per-node": 300,
}
FINAL_RE = re.compile(rf"quickstart: round {ROUNDS} federated accuracy (\d\.\d+)")


@pytest.fixture
def task(monkeypatch: pytest.MonkeyPatch):
    """The example's task module, imported as the app imports it (package `quickstart`)."""
    monkeypatch.syspath_prepend(str(QUICKSTART))
    monkeypatch.delitem(sys.modules, "quickstart", raising=False)
    monkeypatch.delitem(sys.modules, "quickstart.task", raising=False)
    import quickstart.task

    yield quickstart.task
    quickstart.task._read_idx.cache_clear()


def test_three_short_files_change_one_strategy_line_and_one_train_call() -> None:
    texts = {name: (QUICKSTART / "quickstart" / name).read_text() for name in FILES}
    assert sum(text.count("\n") for text in texts.values()) < 150
    assert texts["server_app.py"].count("FedBATStrategy(") == 1
    assert texts["client_app.py"].count("client.train(") == 1
    assert "fedbat_flwr" not in texts["task.py"], "the model and data are the user's own"
    assert "Strategy(" not in texts["client_app.py"] and "train(" not in texts["server_app.py"]


def test_the_quickstart_bundle_holds_its_own_folder_only() -> None:
    fab = set(fab_contents(QUICKSTART))
    modules = {f"quickstart/{name}" for name in ("__init__.py", *FILES)}
    assert fab == {"pyproject.toml", "README.md", *modules}


def test_nodes_hold_disjoint_capped_shares(task) -> None:
    shares = [task.load_data(i, 3, 32, max_examples=100) for i in range(3)]
    assert [(len(tr.dataset), len(te.dataset)) for tr, te in shares] == [(80, 20)] * 3
    x0 = shares[0][0].dataset.tensors[0]
    assert x0.shape[1:] == (1, 28, 28) and -1.0 <= x0.min() < x0.max() <= 1.0
    flat = [torch.cat([tr.dataset.tensors[0], te.dataset.tensors[0]]).flatten(1).numpy()
            for tr, te in shares]  # fmt: skip
    rows = {row.tobytes() for share in flat for row in share}
    assert len(rows) == 300, "no image is in two nodes' shares (nor in a node's two splits)"
    assert len(task.load_data(0, 2, 32)[0].dataset) == int(0.8 * 30_000)


def test_missing_data_names_the_folder_and_the_package(task, monkeypatch, tmp_path) -> None:
    task._read_idx.cache_clear()
    monkeypatch.setattr(task, "DATA_DIR", tmp_path / "fashion-mnist")
    with pytest.raises(FileNotFoundError, match=r"fashion-mnist.*apt-get install dataset-fas"):
        task.load_data(0, 2, 32)


@pytest.mark.e2e
def test_quickstart_runs_in_flowers_simulation(superlink: LocalSuperLink, tmp_path: Path, task):
    final_model = tmp_path / "final_model.pt"
    config = {**RUN_CONFIG, "final-model": str(final_model)}
    lines: list[str] = []
    # One CPU a ClientApp: three one-thread ClientApps, not one two-thread one at a time.
    code = superlink.run(
        config,
        num_supernodes=3,
        app_dir=QUICKSTART,
        on_line=lines.append,
        timeout=300,
        federation={"client-resources-num-cpus": 1},
    )
    log = "\n".join(lines)
    assert code == 0, log[-4000:]
    assert log.count("Aggregated MetricRecord: {'train-loss'") == ROUNDS, log[-4000:]
    assert log.count("aggregate_evaluate: Received 3 results and 0 failures") == ROUNDS
    final = FINAL_RE.search(log)
    assert final is not None, log[-4000:]
    assert float(final[1]) > 0.3, "above chance (0.1) after two rounds"

    model = task.Net()
    model.load_state_dict(torch.load(final_model))
    _, held_out = task.load_data(0, 3, 64, max_examples=300)
    loss, accuracy = task.test(model, held_out, torch.device("cpu"))
    assert np.isfinite(loss) and accuracy > 0.3, "the saved model is the trained one"

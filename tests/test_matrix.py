"""The combinations most likely to break, for 3 rounds through the matrix harness (the whole
matrix is `python -m fedbat_tools.matrix`, results/matrix): every payload kind with each
server optimizer and robust rule completes with no honest reply refused and a float32 model
whose variances stay positive, or is refused at start-up naming the aggregator."""

from __future__ import annotations

import numpy as np
import pytest

from fedbat_flwr.data import DataUnavailableError
from fedbat_flwr.methods import get_method
from fedbat_tools.matrix import Federation, Protocol

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# One method per payload kind (zerofl too: its updates are larger than top-k's).
METHODS = ("fedbat", "ef-signsgd", "fedavg", "topk", "zerofl", "fedpaq", "bifl", "fedbif", "fedpm")
RISKY = ("fedadam", "fedyogi", "krum", "fedtrimmedavg", "sign-median")
SIGN_KINDS = ("signs", "signs-unbounded")
OWN_AGGREGATION = ("fedbif", "fedpm")


@pytest.fixture(scope="module")
def federation() -> Federation:
    try:
        return Federation(Protocol(rounds=3, clients=3, examples=32, test_examples=100))
    except DataUnavailableError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")


@pytest.mark.parametrize("method", METHODS)
def test_risky_aggregators_run_or_are_refused_at_start_up(federation, method: str) -> None:
    kind = get_method(method).payload_kind
    for aggregator in RISKY:
        cell = federation.run(method, aggregator)
        refused = method in OWN_AGGREGATION or (
            aggregator == "sign-median" and kind not in SIGN_KINDS
        )
        if refused:
            assert cell.status == "refused" and "'aggregator'" in cell.reason, cell
            continue
        assert cell.status == "ok", cell.reason
        assert cell.rejected == 0, f"{method} x {aggregator}: honest replies refused"
        assert 0.0 <= cell.final_accuracy <= 1.0
        assert cell.final_model is not None
        for name, value in cell.final_model.items():
            assert value.dtype == np.float32, (aggregator, name, value.dtype)
            if name.endswith("running_var"):
                assert np.all(value > 0), (aggregator, name)

"""BiFL's server scores the binary network its clients compute with, not the latent floats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedbat_flwr import server_app
from fedbat_flwr.config import RunConfig
from fedbat_flwr.data import TensorData
from fedbat_flwr.methods import get_method
from fedbat_flwr.methods.bifl import SignSTE
from fedbat_flwr.methods.common import parametrized_weights
from fedbat_flwr.records import arrays_to_record
from fedbat_flwr.results import Checkpointer, RoundStats, RunRecorder
from fedbat_flwr.server_part import BinaryNetworkPart, ServerPart, binary_network
from fedbat_flwr.task import build_model_for, load_state, model_spec, state_arrays
from fedbat_flwr.training import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)
    )


def test_binary_network_is_alpha_sign_per_binarized_tensor() -> None:
    model = tiny_model()
    spec = model_spec(model)
    weights = state_arrays(model)
    weights["0.weight"].reshape(-1)[:2] = [0.0, -0.0]  # sign(0) = +1, as the clients' forward
    out = binary_network(spec, weights)
    for name in ("0.weight", "4.weight"):  # conv and linear weights
        w = weights[name]
        alpha = np.float32(np.abs(w).mean(dtype=np.float64))
        np.testing.assert_array_equal(out[name], np.where(w >= 0, alpha, -alpha))
        assert out[name].dtype == np.float32
    assert out["0.weight"].reshape(-1)[0] == out["0.weight"].reshape(-1)[1] > 0
    for name in ("0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "4.bias"):
        np.testing.assert_array_equal(out[name], weights[name])  # full precision, as trained


def test_binary_network_computes_what_the_clients_forward_pass_computes() -> None:
    """The clients' SignSTE view of the global weights = a plain model holding
    `binary_network(...)`; the same weights as a float model compute something else."""
    model = tiny_model()
    spec = model_spec(model)
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # latent weights far from +-alpha
        model[1].running_mean.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    latent = state_arrays(model)
    with torch.no_grad():
        as_float = model(x)
        with parametrized_weights(model, SignSTE):
            as_client = model(x)
    plain = tiny_model().eval()
    load_state(plain, binary_network(spec, latent))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), as_client, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(as_float, as_client, atol=1e-2)


@pytest.mark.parametrize("name", ["bifl", "bifl-full"])
def test_bifl_variants_are_evaluated_as_binary_networks(name: str) -> None:
    model = tiny_model()
    spec = model_spec(model)
    evaluation = get_method(name)(RunConfig(method=name)).server_part(spec)
    assert isinstance(evaluation, BinaryNetworkPart)
    weights = state_arrays(model)
    tested = evaluation.eval_arrays(weights)
    for key, value in binary_network(spec, weights).items():
        np.testing.assert_array_equal(tested[key], value)
    latent = evaluation.side_arrays(weights)["latent"]
    for key, value in weights.items():
        np.testing.assert_array_equal(latent[key], value)
    assert type(get_method("fedavg")(RunConfig()).server_part(spec)) is ServerPart


def test_central_evaluation_scores_the_binary_network_and_the_latent_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round's row: test_accuracy / test_loss of the binary network, *_latent of the
    global weights as a float model (the existing keys keep their meaning: the tested model)."""
    gen = torch.Generator().manual_seed(2)
    test = TensorData(torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,)))
    monkeypatch.setattr(server_app, "load_test_set", lambda *args, **kwargs: test)
    config = RunConfig(method="bifl", num_server_rounds=1)
    model = build_model_for(config)
    spec = model_spec(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    weights = state_arrays(model)
    recorder = RunRecorder.continuing(None, tmp_path / "run", "bifl", {}, spec.num_params, 1)
    part = get_method("bifl")(config).server_part(spec)
    central = server_app.CentralEvaluation(config, part)
    checkpointer = Checkpointer(recorder, dict, lambda state: None)
    results = server_app.RoundResults(config, central, {1: RoundStats()}, checkpointer)
    record: ArrayRecord = arrays_to_record(weights)
    results(1, record)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])

    def score(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        load_state(central.model, arrays)  # the server's own (prepared) model and device
        return evaluate(central.model, test.x, test.y, device=central.device)

    binary_loss, binary_accuracy = score(binary_network(spec, weights))
    latent_loss, latent_accuracy = score(weights)
    assert row["test_loss"] == pytest.approx(binary_loss, rel=1e-6)
    assert row["test_accuracy"] == pytest.approx(binary_accuracy)
    assert row["test_loss_latent"] == pytest.approx(latent_loss, rel=1e-6)
    assert row["test_accuracy_latent"] == pytest.approx(latent_accuracy)
    assert abs(binary_loss - latent_loss) > 1e-3  # the two readings differ

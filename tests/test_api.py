"""The library API: a user's own torch model and DataLoader, `FedBATStrategy` / `make_strategy`
on the server and `fedbat_flwr.client.train` on the client, messages as Flower builds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedbat_flwr
from fedbat_flwr import client
from fedbat_flwr.records import record_to_arrays
from fedbat_flwr.strategies import FedBATStrategy, make_strategy
from fedbat_tools.messages import metadata_from

pytestmark = pytest.mark.usefixtures("in_a_run", "one_torch_thread")


class Grid:
    def get_node_ids(self) -> list[int]:
        return [7, 8]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)
    )


def _loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :3].argmax(1)).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _round(strategy, server_round: int = 1, **train_kwargs) -> tuple[dict, list[Message]]:
    """Flower's round by hand: configure, each node trains its own model, aggregate."""
    master = strategy.initial_arrays
    messages = list(strategy.configure_train(server_round, master, ConfigRecord(), Grid()))
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                          run_config={})  # fmt: skip
        reply = client.train(_model(), _loader(node), msg, context=context, **train_kwargs)
        replies.append(Message(reply.content, metadata=metadata_from(node)))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None and strategy.rounds[server_round].num_rejected == 0
    return record_to_arrays(arrays), messages


def test_fedbat_strategy_trains_a_users_model_from_its_state_dict() -> None:
    model = _model()
    strategy = fedbat_flwr.FedBATStrategy(ArrayRecord(model.state_dict()), rho=4.0, phi=0.25)
    new, messages = _round(strategy)
    config = messages[0].content["config"]
    assert config["method"] == "fedbat" and config["rho"] == 4.0 and config["phi"] == 0.25
    old = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert "2.num_batches_tracked" not in new  # the int counter stays with the clients
    step = np.abs(new["1.weight"] - old["1.weight"])
    assert step.max() > 0 and step.max() <= 2 * 5e-2 + 1e-6  # two clients, |step| <= alpha-max
    assert strategy.rounds[1].num_replies == 2


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("fedavg", {}),
        ("signsgd", {"signsgd_alpha": 0.002}),
        ("ef-signsgd", {}),
        ("topk", {"topk_density": 0.5}),
        ("fedbat", {"aggregator": "fedadam", "eta": 0.01}),
        ("signsgd", {"aggregator": "krum", "num_malicious_nodes": 0}),
    ],
)
def test_make_strategy_runs_each_method_with_the_same_client_call(method, kwargs) -> None:
    strategy = make_strategy(method, ArrayRecord(_model().state_dict()), min_train_nodes=2,
                             **kwargs)  # fmt: skip
    new, messages = _round(strategy, lr=0.05)
    assert messages[0].content["config"]["method"] == method
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in new.values())


def test_error_feedback_memory_lives_in_the_context_state() -> None:
    strategy = make_strategy("ef-signsgd", ArrayRecord(_model().state_dict()))
    msg = next(iter(strategy.configure_train(1, strategy.initial_arrays, ConfigRecord(), Grid())))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    client.train(_model(), _loader(7), msg, context=context)
    assert client.STATE_KEY in context.state


def test_flowers_sampling_arguments_reach_flower() -> None:
    """fraction_train and min_train_nodes are run-config keys too; Flower must still get them."""
    arrays = ArrayRecord(_model().state_dict())
    for strategy in (
        FedBATStrategy(arrays, fraction_train=0.3, min_train_nodes=5, fraction_evaluate=0.2),
        make_strategy("signsgd", arrays, fraction_train=0.3, min_train_nodes=5),
    ):
        assert (strategy.fraction_train, strategy.min_train_nodes) == (0.3, 5)
    with pytest.raises(ValueError, match="'fraction-train'"):
        FedBATStrategy(arrays, fraction_train=1.5)


def test_bad_arguments_are_named() -> None:
    arrays = ArrayRecord(_model().state_dict())
    with pytest.raises(TypeError, match="unknown argument"):
        FedBATStrategy(arrays, rhoo=6.0)
    with pytest.raises(ValueError, match=r"'phi' = 2\.0 is out of range"):
        FedBATStrategy(arrays, phi=2.0)
    with pytest.raises(ValueError, match="method 'fedpm' starts from the app's own model"):
        make_strategy("fedpm", arrays)
    with pytest.raises(ValueError, match="'method' = 'nope' is unknown"):
        make_strategy("nope", arrays)


def test_a_train_config_given_to_start_wins_over_the_strategys_options() -> None:
    strategy = FedBATStrategy(ArrayRecord(_model().state_dict()), lr=0.1)
    config = ConfigRecord({"lr": 0.01})
    msg = next(iter(strategy.configure_train(1, strategy.initial_arrays, config, Grid())))
    assert msg.content["config"]["lr"] == 0.01 and msg.content["config"]["rho"] == 6.0

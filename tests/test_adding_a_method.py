"""docs/ARCHITECTURE.md, "Adding a method", followed from this file alone.

A toy method: its client part sends each tensor's update as int8 levels with one float32 scale
(a wire kind of its own, `toy-int8`), its server part refuses an all-zero update and reports
the mean |weight| of the evaluated model. Registered by name here (and unregistered after each
test), it is picked up by the same start-up check and strategy the ServerApp uses: no other
file knows about it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from fedbat_flwr import server_app
from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.methods import ClientUpdate, LocalTask, Method, base, get_method, register
from fedbat_flwr.methods.common import local_delta, option, train_plain
from fedbat_flwr.preflight import check_method
from fedbat_flwr.records import payload_to_record, record_to_arrays, wire_bytes
from fedbat_flwr.server_part import ServerPart, expect
from fedbat_flwr.wire import AlphaBounds, ModelSpec, PayloadError, codecs, register_codec
from tests.strategy_helpers import reply
from tests.test_methods import tiny_task

KIND = "toy-int8"
LEVELS = 127


# -- the wire kind (numpy only) ------------------------------------------------------------------


@dataclass(frozen=True)
class ToyDecoded:
    """A validated toy payload: the dense update it stands for."""

    update: dict[str, np.ndarray]
    absolute: ClassVar[bool] = False

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        for name, value in self.update.items():
            acc[name] += np.float32(weight) * value

    def delta(self) -> dict[str, np.ndarray]:
        return dict(self.update)


def encode_toy(spec: ModelSpec, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """int8 levels of every tensor in spec order, one scale (max |entry|) per tensor."""
    scales = np.array([np.abs(update[t.name]).max(initial=0.0) for t in spec], np.float32)
    levels = [
        np.round(update[t.name].reshape(-1) / (s if s > 0 else 1.0) * LEVELS)
        for t, s in zip(spec, scales, strict=True)
    ]
    return {"levels": np.concatenate(levels).astype(np.int8), "scales": scales}


def decode_toy(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> ToyDecoded:
    """Total: a checked update or a PayloadError naming the field."""
    expect(set(payload) == {"levels", "scales"}, "keys", f"{sorted(payload)}")
    levels, scales = payload["levels"], payload["scales"]
    expect(levels.dtype == np.int8 and levels.shape == (spec.num_params,), "levels", "layout")
    expect(scales.dtype == np.float32 and scales.shape == (len(spec.names),), "scales", "layout")
    expect(bool(np.isfinite(scales).all() and (scales >= 0).all()), "scales", "not finite >= 0")
    update, start = {}, 0
    for t, scale in zip(spec, scales, strict=True):
        limit = bounds.stat[1] if t.kind == "stat" else bounds.update
        expect(float(scale) <= limit, "scales", f"{t.name}: {scale} above {limit}")
        part = levels[start : start + t.size].astype(np.float32) * (scale / LEVELS)
        update[t.name], start = part.reshape(t.shape), start + t.size
    return ToyDecoded(update)


# -- the server part (numpy only) ----------------------------------------------------------------


class ToyPart(ServerPart):
    """The default broadcast and mean, plus a check and a figure of its own."""

    def check(self, decoded: object, server_round: int) -> None:
        update = decoded.delta()  # type: ignore[attr-defined]
        moved = any(np.any(value != 0) for value in update.values())
        expect(moved, "levels", "an all-zero update carries nothing to aggregate")

    def eval_metrics(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        values = np.concatenate([np.abs(v).reshape(-1) for v in global_arrays.values()])
        return {"toy_mean_abs_weight": float(values.mean())}


# -- the method: client part + server part + wire kind, by name ----------------------------------


class ToyInt8(Method):
    """Local SGD, then the update as int8 levels."""

    name = "toy-int8"
    payload_kind = KIND

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.epochs = option(config, "toy-epochs", 1, lambda e: 1 <= e <= 3, "1, 2 or 3")

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        payload = encode_toy(task.spec, local_delta(task))
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})

    def server_part(self, spec: ModelSpec) -> ServerPart:
        return ToyPart(spec, self.broadcast(spec))  # the run's model broadcast


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Register the toy method and its wire kind for one test, as a method file would at
    import; the registries are restored afterwards, so no other test sees them."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(codecs, "_DECODERS", dict(codecs._DECODERS))
    register(ToyInt8)
    register_codec(KIND, decode_toy)
    torch.set_num_threads(1)  # a tiny model on a shared CPU
    yield


# -- the tests -----------------------------------------------------------------------------------


def test_the_start_up_check_instantiates_it_and_names_a_bad_option() -> None:
    method = check_method(RunConfig(method="toy-int8", extra={"toy-epochs": 2}))
    assert isinstance(method, ToyInt8) and method.epochs == 2
    assert get_method("toy-int8") is ToyInt8
    with pytest.raises(ConfigError, match=r"'toy-epochs' = 7 is not allowed; allowed: 1, 2 or 3"):
        check_method(RunConfig(method="toy-int8", extra={"toy-epochs": 7}))


def test_the_servers_strategy_validates_and_aggregates_its_replies() -> None:
    """Two clients train and reply; a third sends an all-zero update (the part's check) and a
    fourth a scale above max-update-entry (the codec): the model is master + the weighted mean
    of the two valid updates, and the round counts two rejections."""
    config = RunConfig(method="toy-int8", lr=0.5, bn_payload="binary", max_update_entry=5.0)
    method = check_method(config)
    tasks = [tiny_task(config, seed=seed) for seed in (1, 2)]
    spec = tasks[0].spec
    part = method.server_part(spec)
    strategy = server_app._strategy(config, method, part, round_offset=0, rounds={})
    master = part.initial(tasks[0].global_state)
    strategy.global_arrays = master

    updates = [method.train(task) for task in tasks]
    zero = encode_toy(spec, {t.name: np.zeros(t.shape, np.float32) for t in spec})
    huge = encode_toy(spec, {t.name: np.full(t.shape, 9.0, np.float32) for t in spec})
    replies = [
        reply(1, payload_to_record(updates[0].payload), 10, **updates[0].metrics),
        reply(2, payload_to_record(updates[1].payload), 30, **updates[1].metrics),
        reply(3, payload_to_record(zero), num_examples=10),
        reply(4, payload_to_record(huge), num_examples=10),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    stats = strategy.rounds[1]
    assert (stats.num_replies, stats.num_rejected) == (2, 2)
    sizes = [wire_bytes(payload_to_record(u.payload)) for u in updates]
    assert stats.uplink_bytes == sum(sizes)
    steps = [decode_toy(u.payload, spec, method.step_bounds(config)).update for u in updates]
    expected = spec.apply(master, {n: 0.25 * steps[0][n] + 0.75 * steps[1][n] for n in master})
    new = record_to_arrays(arrays)
    for name, value in expected.items():
        np.testing.assert_allclose(new[name], value, rtol=1e-6, err_msg=name)
    assert metrics is not None and "train-loss" in metrics
    assert "toy_mean_abs_weight" in part.eval_metrics(new)


def test_its_downlink_is_the_default_broadcast() -> None:
    config = RunConfig(method="toy-int8", downlink_bits=4)
    spec = tiny_task(config).spec
    part = check_method(config).server_part(spec)
    sent = part.downlink(tiny_task(config).global_state, 1)
    assert "codes" in sent  # the quantized copy of `downlink-bits` < 32
    with pytest.raises(PayloadError):
        decode_toy({"levels": np.zeros(3, np.int8)}, spec, AlphaBounds())

"""Baseline client transforms against their formulas, on a tiny model (Linear 4->3 + BN)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedbat_flwr.aggregators import SignVote
from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.methods import LocalTask, get_method, method_names
from fedbat_flwr.methods.bifl import SignSTE
from fedbat_flwr.methods.common import local_delta, statistics_for_sent_update, train_plain
from fedbat_flwr.methods.noisy_signsgd import noisy_sign_bits
from fedbat_flwr.methods.stoc_signsgd import stochastic_sign_bits
from fedbat_flwr.methods.zerofl import TopKWeights
from fedbat_flwr.records import (
    arrays_to_record,
    payload_to_record,
    record_to_arrays,
    record_to_payload,
)
from fedbat_flwr.strategy import build_strategy
from fedbat_flwr.task import load_state, model_spec, state_arrays
from fedbat_flwr.training import TensorBatches
from fedbat_flwr.wire import (
    AlphaBounds,
    ModelSpec,
    PayloadError,
    TensorSpec,
    decode_payload,
    encode_signs,
    majority_vote,
    validate_signs,
)
from fedbat_flwr.wire.kbit import level_values, unpack_uint
from tests.strategy_helpers import reply

CPU = torch.device("cpu")
PARAMS = ("1.weight", "2.weight", "2.bias")
STATS = ("2.running_mean", "2.running_var")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_task(
    config: RunConfig | None = None,
    *,
    seed: int = 0,
    global_state: dict[str, np.ndarray] | None = None,
    state: dict[str, np.ndarray] | None = None,
) -> LocalTask:
    """A LocalTask built like the ClientApp builds one, around nn.Linear(4, 3) + BatchNorm1d."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3))
    if global_state is not None:
        load_state(model, global_state)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 1, 2, 2, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return LocalTask(
        model=model,
        global_state=state_arrays(model),
        spec=model_spec(model),
        batches=TensorBatches(x, y, 8, gen),
        # 1-bit BatchNorm: these tests pin every tensor's payload (float BatchNorm, the default:
        # tests/test_bn_payload.py).
        config=config or RunConfig(lr=0.5, bn_payload="binary"),
        device=CPU,
        seed=seed,
        server_round=1,
        state={} if state is None else state,
    )


def run(name: str, task: LocalTask, **extra: object):
    """Train ``name`` on ``task``; return (update, the model's update m, decoded payload)."""
    config = task.config.replace(extra=dict(extra)) if extra else task.config
    method = get_method(name)(config)
    update = method.train(task)
    pack = arrays_to_record if method.payload_kind == "dense" else payload_to_record
    payload = record_to_payload(pack(update.payload))
    # lr 0.5 on the tiny model moves single entries by up to ~40 (ZeroFL): the run's bound on
    # data-sized steps (max-update-entry) is pinned in tests/test_hostile_influence.py.
    bounds = method.step_bounds(config.replace(max_update_entry=1e3))
    decoded = decode_payload(method.payload_kind, payload, task.spec, bounds)
    return update, local_delta(task), decoded


def signs_of(m: np.ndarray, alpha: float) -> np.ndarray:
    a = np.float32(alpha)
    return np.where(m >= 0, a, -a)


def assert_stats_one_bit(m: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    for name in STATS:
        np.testing.assert_array_equal(out[name], signs_of(m[name], np.abs(m[name]).mean()))


# --- registry and config ------------------------------------------------------------------


def test_every_baseline_is_registered() -> None:
    expected = {"signsgd", "ef-signsgd", "noisy-signsgd", "stoc-signsgd", "fedpaq", "topk"}
    assert expected | {"zerofl", "bifl", "bifl-full", "fedavg", "fedbat"} <= set(method_names())


def test_method_keys_are_in_pyproject() -> None:
    """Flower refuses --run-config overrides of keys the app's pyproject does not declare."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parent.parent
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    sources = "".join(p.read_text() for p in (root / "fedbat_flwr" / "methods").glob("*.py"))
    read = set(re.findall(r'option\(\s*config,\s*"([^"]+)"', sources))
    declared = {key for name in method_names() for key in get_method(name).options}
    assert {"signsgd-alpha", "noisy-alpha", "stoc-alpha", "quant-bits"} <= declared
    assert read <= declared, sorted(read - declared)  # every key a method reads, it declares
    assert declared <= set(table), sorted(declared - set(table))
    config = RunConfig.from_flower(table)  # the defaults parse and every method accepts them
    for name in method_names():
        get_method(name)(config)
    assert get_method("signsgd")(config).alpha == 0.001


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [("signsgd", "signsgd-alpha", 0.0), ("noisy-signsgd", "noisy-sigma", -1.0),
     ("stoc-signsgd", "stoc-alpha", math.nan), ("fedpaq", "quant-bits", 9),
     ("topk", "topk-density", 0.0), ("topk", "topk-density", 1.5),
     ("zerofl", "zerofl-sparsity", 1.0), ("zerofl", "zerofl-density", -0.1),
     ("zerofl", "zerofl-max-update-entry", 0.0), ("zerofl", "zerofl-max-update-entry", math.inf)],
)  # fmt: skip
def test_bad_method_options_name_the_key(name: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        get_method(name)(RunConfig(extra={key: value}))


def test_sign_aggregation_maps_onto_the_aggregator() -> None:
    signsgd = get_method("signsgd")
    assert signsgd.aggregator(RunConfig()) == "fedavg"
    assert signsgd.aggregator(RunConfig(aggregator="krum")) == "krum"
    majority = RunConfig(extra={"sign-aggregation": "majority"})
    assert signsgd.aggregator(majority) == "majority"
    with pytest.raises(ConfigError, match="conflicts"):
        signsgd.aggregator(majority.replace(aggregator="krum"))
    with pytest.raises(ConfigError, match="'sign-aggregation'"):
        signsgd.aggregator(RunConfig(extra={"sign-aggregation": "median"}))
    assert get_method("fedbat").aggregator(RunConfig(aggregator="krum")) == "krum"


# --- sign methods -------------------------------------------------------------------------


def test_signsgd_sends_fixed_alpha_signs() -> None:
    update, m, decoded = run("signsgd", tiny_task(), **{"signsgd-alpha": 0.1})
    out = decoded.delta()
    for name in PARAMS:
        np.testing.assert_array_equal(out[name], signs_of(m[name], 0.1))
    assert_stats_one_bit(m, out)
    assert update.num_examples == 32 and math.isfinite(update.metrics["train-loss"])
    with pytest.raises(PayloadError, match="out of range"):  # FedBAT's clamp would refuse 0.1
        decode_payload("signs", update.payload, tiny_task().spec, AlphaBounds())


def test_sign_methods_send_statistics_of_the_weights_they_send() -> None:
    """BatchNorm statistics describe global + alpha sign (what the server builds), not the
    trained model: with a small fixed alpha the two differ completely (FMNIST: chance vs 59 %)."""
    task = tiny_task()
    train_plain(task)
    trained = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    delta = local_delta(task)
    bits = {t.name: delta[t.name] >= 0 for t in task.spec if t.kind == "param"}
    statistics_for_sent_update(task, {k: np.where(b, 0.01, -0.01) for k, b in bits.items()})
    for name, p in task.model.named_parameters():
        assert torch.equal(p, trained[name])  # the trained weights stay
    sent = task.global_state["1.weight"] + np.where(bits["1.weight"], 0.01, -0.01)
    x = task.batches.x.reshape(len(task.batches.x), -1).numpy()
    expected_mean = (x @ sent.T).mean(axis=0)  # 4 equal batches: the mean of batch means
    np.testing.assert_allclose(task.model[2].running_mean.numpy(), expected_mean, atol=1e-6)
    assert task.model[2].momentum == 0.1 and task.model.training


def _ef_expected(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.float32(np.abs(p, dtype=np.float64).mean())
    sent = signs_of(p, alpha)
    return sent, p - sent


def test_ef_signsgd_carries_the_residual_across_rounds() -> None:
    task1 = tiny_task(seed=1)
    _, m1, decoded1 = run("ef-signsgd", task1)
    sent1 = decoded1.delta()
    residual1 = {}
    for name in PARAMS:  # round 1: e = 0, p = m
        expected, residual1[name] = _ef_expected(m1[name])
        np.testing.assert_array_equal(sent1[name], expected)
        np.testing.assert_array_equal(task1.state[name], residual1[name])
        np.testing.assert_allclose(sent1[name] + task1.state[name], m1[name], atol=1e-7)
    assert_stats_one_bit(m1, sent1)
    assert set(task1.state) == set(PARAMS)

    # The ClientApp stores the state in context.state as an ArrayRecord and reads it back.
    restored = record_to_arrays(arrays_to_record(task1.state))
    new_global = task1.spec.apply(task1.global_state, sent1)
    task2 = tiny_task(seed=2, global_state=new_global, state=restored)
    _, m2, decoded2 = run("ef-signsgd", task2)
    sent2 = decoded2.delta()
    for name in PARAMS:  # round 2: p = m + e
        p2 = m2[name] + residual1[name]
        expected, residual2 = _ef_expected(p2)
        np.testing.assert_array_equal(sent2[name], expected)
        np.testing.assert_array_equal(task2.state[name], residual2)


def test_ef_signsgd_refuses_a_residual_of_another_shape() -> None:
    with pytest.raises(ValueError, match="another model"):
        run("ef-signsgd", tiny_task(state={"1.weight": np.zeros(5, np.float32)}))


def test_noisy_signsgd_sends_fixed_alpha_and_noisy_signs() -> None:
    _, m, decoded = run("noisy-signsgd", tiny_task(), **{"noisy-sigma": 0.0})
    out = decoded.delta()
    for name in PARAMS:  # sigma = 0: plain signs, alpha = noisy-alpha
        np.testing.assert_array_equal(out[name], signs_of(m[name], 0.01))
    assert_stats_one_bit(m, out)


def test_noisy_sign_probability_is_gaussian_cdf() -> None:
    rng = np.random.default_rng(0)
    m = np.array([0.01, -0.005, 0.0, 0.03], np.float32)
    n = 20_000
    freq = np.mean([noisy_sign_bits(m, 0.01, rng) for _ in range(n)], axis=0)
    p = 0.5 * (1 + np.vectorize(math.erf)(m / 0.01 / math.sqrt(2)))  # Phi(m / sigma)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-3)


def test_stoc_signsgd_sends_fixed_alpha() -> None:
    _, m, decoded = run("stoc-signsgd", tiny_task())
    out = decoded.delta()
    for name in PARAMS:
        assert set(np.abs(out[name]).ravel().tolist()) == {np.float32(0.01)}
    assert_stats_one_bit(m, out)


def test_stochastic_sign_is_unbiased() -> None:
    """E[||m||_inf (2b - 1)] = m: the mean of N draws is within 5 standard errors of m.

    The same bound rejects the deterministic ||m||_inf sign(m) (biased for |m_i| < ||m||_inf).
    """
    rng = np.random.default_rng(0)
    m = np.array([0.2, -0.05, 0.0, -0.2, 0.13], np.float32)
    scale = float(np.abs(m).max())
    n = 20_000
    draws = np.stack([scale * (2.0 * stochastic_sign_bits(m, rng) - 1) for _ in range(n)])
    bound = 5 * scale / np.sqrt(n)
    assert np.all(np.abs(draws.mean(axis=0) - m) < bound)
    biased = scale * np.where(m >= 0, 1.0, -1.0)
    assert np.any(np.abs(biased - m) > bound)


# --- FedPAQ, top-k ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
def test_fedpaq_quantizes_each_update_within_one_level(bits: int) -> None:
    update, m, decoded = run("fedpaq", tiny_task(), **{"quant-bits": bits})
    out = decoded.delta()
    assert int(update.payload["header"][4]) == bits
    for t, scale in zip(tiny_task().spec, update.payload["scales"], strict=True):
        assert scale == pytest.approx(np.abs(m[t.name]).max(), rel=1e-6)
        step = 2 * float(scale) / (2**bits - 1)
        assert np.all(np.abs(out[t.name] - m[t.name]) <= step * (1 + 1e-5))
    codes = unpack_uint(update.payload["levels"][: -(-12 * bits // 8)], bits, 12)  # 1.weight
    np.testing.assert_allclose(
        out["1.weight"].ravel(), level_values(float(update.payload["scales"][0]), bits)[codes]
    )


def test_topk_keeps_the_largest_entries_and_all_statistics() -> None:
    update, m, decoded = run("topk", tiny_task(), **{"topk-density": 0.25})
    out = decoded.delta()
    for name in PARAMS:
        flat, sent = m[name].ravel(), out[name].ravel()
        k = math.ceil(0.25 * flat.size)
        kept = np.flatnonzero(sent)
        assert kept.size == k
        np.testing.assert_array_equal(sent[kept], flat[kept])
        assert np.abs(flat[kept]).min() >= np.sort(np.abs(flat))[-k]
    for name in STATS:
        np.testing.assert_array_equal(out[name], m[name])
    np.testing.assert_array_equal(update.payload["meta"][:, 0], [3, 1, 1, 3, 3])


@pytest.mark.parametrize("name", ["topk", "zerofl"])
def test_sparse_methods_send_statistics_of_the_weights_they_send(name: str) -> None:
    """Statistics describe global + the kept entries (what the server builds), not the trained
    model (compare-methods, FMNIST: top-k 18 % in eval mode, 50 % with batch statistics)."""
    task = tiny_task()
    _, _, decoded = run(name, task, **{f"{name}-density": 0.25})
    out = decoded.delta()
    sent = task.global_state["1.weight"] + out["1.weight"]
    assert 0 < np.count_nonzero(out["1.weight"]) < out["1.weight"].size
    x = task.batches.x.reshape(len(task.batches.x), -1).numpy()
    expected_mean = (x @ sent.T).mean(axis=0)  # 4 equal batches: the mean of batch means
    np.testing.assert_allclose(out["2.running_mean"], expected_mean, rtol=1e-5)
    trained_mean = task.model[2].running_mean.numpy()  # the model keeps the refit statistics
    np.testing.assert_allclose(trained_mean, expected_mean, rtol=1e-5)
    assert not np.allclose(
        (x @ state_arrays(task.model)["1.weight"].T).mean(axis=0), expected_mean, atol=1e-3
    )  # the trained weights, which stay, would give other statistics


def test_swat_forward_uses_top_weights_and_gradient_is_dense() -> None:
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.4, 0.3, -0.2]]))
    parametrize.register_parametrization(lin, "weight", TopKWeights(sparsity=0.5))
    torch.testing.assert_close(lin.weight, torch.tensor([[0.0, -0.4, 0.3, 0.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    lin(x).sum().backward()
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, x)  # every weight


def test_zerofl_trains_sparse_and_uploads_top_k() -> None:
    task = tiny_task()
    update, m, decoded = run("zerofl", task, **{"zerofl-density": 0.25})
    out = decoded.delta()
    np.testing.assert_array_equal(update.payload["meta"][:, 0], [3, 1, 1, 3, 3])
    for name in PARAMS:
        kept = np.flatnonzero(out[name].ravel())
        np.testing.assert_array_equal(out[name].ravel()[kept], m[name].ravel()[kept])
    assert set(state_arrays(task.model)) == set(task.spec.names)  # parametrizations removed


# --- BiFL ---------------------------------------------------------------------------------


def test_sign_ste_forward_and_gradient() -> None:
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.5, 0.0], [-0.25, 2.0, 0.75]]))
    parametrize.register_parametrization(lin, "weight", SignSTE())
    alpha = 5.0 / 6.0
    expected = alpha * torch.tensor([[1.0, -1, 1], [-1, 1, 1]])
    torch.testing.assert_close(lin.weight, expected)
    lin.weight.sum().backward()
    grad = lin.parametrizations.weight.original.grad
    torch.testing.assert_close(grad, torch.tensor([[1.0, 0, 1], [1, 0, 1]]))  # |w| <= 1 only


def test_bifl_uploads_alpha_sign_of_latent_weights() -> None:
    task = tiny_task()
    update, _, decoded = run("bifl", task)
    assert decoded.absolute is True
    latent = state_arrays(task.model)
    assert set(latent) == set(task.spec.names)  # parametrizations were removed again
    assert not np.allclose(latent["1.weight"], task.global_state["1.weight"])  # it trained
    out = decoded.delta()
    w = latent["1.weight"]
    np.testing.assert_array_equal(out["1.weight"], signs_of(w, np.abs(w).mean(dtype=np.float64)))
    for name in ("2.weight", "2.bias", *STATS):  # BatchNorm stays full precision
        np.testing.assert_array_equal(out[name], latent[name])
    assert update.payload["signs"].size == 2 and update.payload["dense"].size == 12


def test_bifl_full_uploads_latent_weights() -> None:
    task = tiny_task()
    _, _, decoded = run("bifl-full", task)
    assert decoded.absolute is True
    for name, value in state_arrays(task.model).items():
        np.testing.assert_array_equal(decoded.delta()[name], value)


# --- server side: absolute mean, majority vote --------------------------------------------

VOTE_SPEC = ModelSpec((TensorSpec("w", (4,)), TensorSpec("bn.running_var", (1,), "stat", "log")))


def _vote_payload(signs: list[int], alpha: float, stat_sign: int) -> dict[str, np.ndarray]:
    bits = {"w": np.array(signs) > 0, "bn.running_var": np.array([stat_sign > 0])}
    return encode_signs(VOTE_SPEC, bits, {"w": alpha, "bn.running_var": 0.5})


VOTES = [  # (signs of w, alpha, sign of the statistic)
    ([+1, +1, -1, -1], 1.0, +1),
    ([+1, -1, +1, -1], 2.0, +1),
    ([-1, -1, +1, -1], 3.0, -1),
    ([-1, +1, -1, -1], 90.0, -1),  # an outlier alpha does not set the step
]
# one vote each: [0, 0, 0, -4] -> ties stay; alpha = median(1, 2, 3, 90) = 2.5
VOTE_DELTA = {"w": np.array([0.0, 0.0, 0.0, -2.5], np.float32), "bn.running_var": [0.0]}


def test_majority_vote_hand_example() -> None:
    bounds = AlphaBounds(param=(0.0, 100.0))
    views = [validate_signs(_vote_payload(s, a, st), VOTE_SPEC, bounds) for s, a, st in VOTES]
    out = majority_vote(VOTE_SPEC, views)
    np.testing.assert_array_equal(out["w"], VOTE_DELTA["w"])
    np.testing.assert_array_equal(out["bn.running_var"], VOTE_DELTA["bn.running_var"])  # tie
    three = majority_vote(VOTE_SPEC, views[:3])  # votes [1, -1, 1, -3], alpha = 2
    np.testing.assert_array_equal(three["w"], [2.0, -2.0, 2.0, -2.0])


def _strategy(kind: str, spec: ModelSpec = VOTE_SPEC, aggregator: str = "majority"):
    """The server's strategy for ``kind``, global model all ones."""
    strategy = build_strategy(
        aggregator,
        spec=spec,
        payload_kind=kind,
        bounds=AlphaBounds(param=(0.0, 10.0), update=100.0),  # EF-SignSGD-like alphas up to 90
        max_num_examples=100,
        fraction_train=1.0,
        min_train_nodes=1,
    )
    strategy.global_arrays = {t.name: np.ones(t.shape, np.float32) for t in spec}
    return strategy


def test_majority_strategy_applies_the_vote() -> None:
    strategy = _strategy("signs-unbounded")
    assert isinstance(strategy.aggregator, SignVote)
    assert strategy.aggregator.vote is majority_vote
    replies = [
        reply(i, payload_to_record(_vote_payload(s, a, st)), num_examples=10**6)
        for i, (s, a, st) in enumerate(VOTES, start=1)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = record_to_arrays(arrays)
    np.testing.assert_allclose(new["w"], 1 + VOTE_DELTA["w"])
    np.testing.assert_allclose(new["bn.running_var"], [1.0])  # exp(0)
    assert build_strategy("majority", **_kwargs("signs")).aggregator.vote is majority_vote
    with pytest.raises(ValueError, match="'majority' votes on sign payloads"):
        build_strategy("majority", **_kwargs("kbit"))


def _kwargs(kind: str) -> dict[str, object]:
    return {
        "spec": VOTE_SPEC,
        "payload_kind": kind,
        "bounds": AlphaBounds(),
        "max_num_examples": 10,
    }


def test_absolute_payloads_average_into_the_new_model() -> None:
    task_a, task_b = tiny_task(seed=3), tiny_task(seed=4)
    up_a, _, dec_a = run("bifl", task_a)
    up_b, _, dec_b = run("bifl", task_b)
    strategy = _strategy("binary-weights", task_a.spec, "fedavg")
    strategy.global_arrays = {k: np.full_like(v, 7.0) for k, v in task_a.global_state.items()}
    replies = [
        reply(1, payload_to_record(up_a.payload), num_examples=1),
        reply(2, payload_to_record(up_b.payload), num_examples=3),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = record_to_arrays(arrays)
    wa, wb = dec_a.delta(), dec_b.delta()
    for name in task_a.spec.names:  # the weighted mean of weights, not global + mean
        np.testing.assert_allclose(new[name], 0.25 * wa[name] + 0.75 * wb[name], rtol=1e-6)

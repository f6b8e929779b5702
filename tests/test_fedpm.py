"""FedPM: Bayesian aggregation by hand, the mask codecs (packed, range-coded, coded against
theta), one round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.methods import LocalTask, get_method
from fedbat_flwr.methods.fedpm import (
    SampledMask,
    _score,
    encode_masks,
    posterior_theta,
    reference_weights,
)
from fedbat_flwr.methods.server.fedpm import FedPMPart
from fedbat_flwr.records import payload_to_record, record_to_payload, wire_bytes
from fedbat_flwr.task import load_state, model_spec, state_arrays
from fedbat_flwr.training import TensorBatches
from fedbat_flwr.wire import (
    AlphaBounds,
    ModelSpec,
    PayloadError,
    TensorSpec,
    decode_payload,
    payload_nbytes,
)
from fedbat_flwr.wire.fedpm import (
    FEDPM_MASK_ID,
    FEDPM_THETA_CODED_ID,
    THETA_CLIP,
    encode_fedpm_mask,
    encode_fedpm_probs,
    validate_fedpm_coded,
    validate_fedpm_probs,
)

CPU = torch.device("cpu")
BOUNDS = AlphaBounds()
SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (1, 3)),
        TensorSpec("bn.weight", (2,)),
        TensorSpec("bn.running_var", (2,), kind="stat", domain="log"),
    )
)
REFERENCE = {
    "conv.weight": np.array([[0.5, -0.5, 0.5]], np.float32),
    "bn.weight": np.ones(2, np.float32),
    "bn.running_var": np.ones(2, np.float32),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def uplink(mask: list[int], sign: bool = True, step: float = 0.0, *, coding: str = "packed"):
    payload = encode_fedpm_mask(
        SPEC,
        {"conv.weight": np.array([mask], bool)},
        {"bn.running_var": np.full(2, sign)},
        {"bn.running_var": step},
        coding=coding,
    )
    return decode_payload("fedpm-mask", record_to_payload(payload_to_record(payload)), SPEC, BOUNDS)


# --- Bayesian aggregation -----------------------------------------------------------------


def test_beta_posterior_mode_and_mean_exact_numbers() -> None:
    """mode = (a - 1) / (a + b - 2), mean = a / (a + b); no evidence (a + b = 2): 1/2."""
    a = np.array([3.0, 1.0, 2.0, 1.0, 11.0])
    b = np.array([2.0, 4.0, 2.0, 1.0, 1.0])
    mode = posterior_theta(a, b)
    np.testing.assert_allclose(mode, [2 / 3, 0.0, 1 / 2, 1 / 2, 1.0], rtol=1e-7)
    np.testing.assert_allclose(posterior_theta(a, b, "mode"), mode)
    mean = posterior_theta(a, b, "mean")
    np.testing.assert_allclose(mean, [3 / 5, 1 / 5, 1 / 2, 1 / 2, 11 / 12], rtol=1e-7)
    assert mode.dtype == mean.dtype == np.float32
    with pytest.raises(ConfigError, match=r"'fedpm-theta' = 'median'.*'mode', 'mean'"):
        posterior_theta(a, b, "median")


def hand_replies() -> list:
    return [
        (10, uplink([1, 0, 1], True, 0.3)),
        (30, uplink([1, 1, 0], False, 0.1)),
        (20, uplink([1, 0, 0], True, 0.0)),
    ]


def test_beta_posterior_mode_hand_example() -> None:
    """Beta(1, 1) + 3 masks: a = 1 + ones, b = 1 + K - ones, theta = (a - 1) / (a + b - 2),
    the fraction of clients that kept the entry."""
    part = FedPMPart(SPEC, REFERENCE, prior_reset=1, seed=0)
    glob = part.initial(REFERENCE)
    np.testing.assert_array_equal(glob["conv.weight"], np.full((1, 3), 0.5))
    new = part.aggregate(glob, hand_replies(), server_round=1)
    np.testing.assert_allclose(new["conv.weight"], [[3 / 3, 1 / 3, 1 / 3]], rtol=1e-7)
    assert part.eval_mask(new)["conv.weight"][0, 0]  # every client kept it: always kept
    np.testing.assert_array_equal(new["bn.weight"], REFERENCE["bn.weight"])  # frozen
    step = (10 * 0.3 - 30 * 0.1) / 60  # example-weighted mean of alpha * sign: 0
    np.testing.assert_allclose(new["bn.running_var"], np.exp(step) * np.ones(2), atol=1e-7)


def test_beta_posterior_mean_is_an_option() -> None:
    part = FedPMPart(SPEC, REFERENCE, prior_reset=1, seed=0, theta="mean")
    new = part.aggregate(part.initial(REFERENCE), hand_replies(), server_round=1)
    np.testing.assert_allclose(new["conv.weight"], [[4 / 5, 2 / 5, 2 / 5]], rtol=1e-7)
    config = RunConfig(method="fedpm", extra={"fedpm-theta": "mean"})
    spec = ModelSpec((TensorSpec("features.0.weight", (32, 1, 3, 3)),))
    assert get_method("fedpm")(config).server_part(spec).theta_rule == "mean"
    assert get_method("fedpm")(RunConfig(method="fedpm")).server_part(spec).theta_rule == "mode"


def test_prior_resets_every_n_rounds() -> None:
    part = FedPMPart(SPEC, REFERENCE, prior_reset=2, seed=0)
    glob = part.initial(REFERENCE)
    ones = [(1, uplink([1, 1, 0]))]
    zeros = [(1, uplink([0, 0, 0]))]
    glob = part.aggregate(glob, ones, 1)  # reset, a = 2, 2, 1; b = 1, 1, 2
    np.testing.assert_allclose(glob["conv.weight"], [[1, 1, 0]])
    glob = part.aggregate(glob, zeros, 2)  # accumulates: a = 2, 2, 1; b = 2, 2, 3
    np.testing.assert_allclose(glob["conv.weight"], [[1 / 2, 1 / 2, 0]])
    glob = part.aggregate(glob, zeros, 3)  # reset again: a = 1; b = 2
    np.testing.assert_allclose(glob["conv.weight"], [[0, 0, 0]])
    state = part.state()
    fresh = FedPMPart(SPEC, REFERENCE, prior_reset=2, seed=0)
    fresh.load_state(state)
    np.testing.assert_array_equal(fresh.a["conv.weight"], [[1, 1, 1]])
    with pytest.raises(ValueError, match="state keys"):
        fresh.load_state({})


@pytest.mark.parametrize(("eps", "logit"), [(1e-3, 6.9068), (0.01, 4.5951)])
def test_client_moves_a_theta_of_zero_or_one(eps: float, logit: float) -> None:
    """theta = 0 or 1 (the mode where all clients agree) gives a finite score, |logit(eps)|."""
    score = _score(np.array([0.0, 1.0, 0.5, 0.3], np.float32), eps, CPU)
    expected = torch.tensor([-logit, logit, 0.0, math.log(0.3 / 0.7)])
    torch.testing.assert_close(score, expected, atol=1e-4, rtol=0)


def test_theta_eps_is_read_with_the_former_clip_as_default() -> None:
    """`fedpm-theta-eps` (the clip `train` hands `_score`) defaults to 1e-3, the clip runs
    made before the key existed used (fedbat-sweep's VALUE_BEFORE_KEY)."""
    assert get_method("fedpm")(RunConfig()).theta_eps == 1e-3
    assert get_method("fedpm")(RunConfig(extra={"fedpm-theta-eps": 0.01})).theta_eps == 0.01


def test_evaluated_model_is_reference_times_a_mask_from_theta() -> None:
    part = FedPMPart(SPEC, REFERENCE, prior_reset=1, seed=0)
    glob = part.initial(REFERENCE)
    glob["conv.weight"] = np.array([[1.0, 0.0, 1.0]], np.float32)
    weights = part.eval_arrays(glob)
    np.testing.assert_array_equal(weights["conv.weight"], [[0.5, 0.0, 0.5]])
    assert part.eval_metrics(glob) == {"model_sparsity": pytest.approx(1 / 3)}
    glob["conv.weight"] = np.full((1, 3), 0.5, np.float32)
    first = part.eval_arrays(glob)["conv.weight"]
    np.testing.assert_array_equal(first, part.eval_arrays(glob)["conv.weight"])  # fixed uniforms
    assert set(np.abs(first).reshape(-1).tolist()) <= {0.0, 0.5}


# --- wire formats -------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(1, 300),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    coding=st.sampled_from(["packed", "density", "theta"]),
)
def test_mask_codec_round_trip(size: int, density: float, seed: int, coding: str) -> None:
    spec = ModelSpec(
        (TensorSpec("a.weight", (size, 1)), TensorSpec("b.weight", (3, 2)),
         TensorSpec("bn.running_mean", (2,), kind="stat"))
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    masks = {"a.weight": rng.random((size, 1)) < density, "b.weight": np.ones((3, 2), bool)}
    signs = {"bn.running_mean": rng.random(2) < 0.5}
    theta = {name: np.float32(rng.random(m.shape) < 0.5) for name, m in masks.items()}
    payload = encode_fedpm_mask(
        spec, masks, signs, {"bn.running_mean": 0.5}, coding=coding, theta=theta
    )
    decoded = decode_payload(
        "fedpm-mask", record_to_payload(payload_to_record(payload)), spec, BOUNDS
    ).resolved(theta)
    for name, mask in masks.items():
        np.testing.assert_array_equal(decoded.view.mask(name), mask.reshape(-1))
    delta = decoded.delta()
    np.testing.assert_array_equal(
        delta["bn.running_mean"], np.where(signs["bn.running_mean"], 0.5, -0.5)
    )


def test_range_coding_beats_packing_on_sparse_masks() -> None:
    spec = ModelSpec((TensorSpec("w.weight", (200, 500)),))
    rng = np.random.default_rng(0)
    wire, data = {}, {}
    for density in (0.05, 0.5):
        masks = {"w.weight": rng.random((200, 500)) < density}
        for coded in (False, True):
            payload = encode_fedpm_mask(
                spec, masks, {}, {}, coding="density" if coded else "packed"
            )
            wire[density, coded] = 8 * wire_bytes(payload_to_record(payload)) / 100_000
            data[density, coded] = 8 * payload_nbytes(payload) / 100_000
    entropy = -(0.05 * math.log2(0.05) + 0.95 * math.log2(0.95))  # 0.286 bit
    assert data[0.05, True] == pytest.approx(entropy, rel=0.01)  # the coder is near-optimal
    assert wire[0.05, True] < 0.5 * wire[0.05, False]  # with Flower's framing (~0.1 bpp here)
    assert wire[0.05, False] > 1.0
    assert data[0.5, True] < 1.002 * data[0.5, False]  # about as packing when dense


def _decided_theta(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """theta as after rounds of agreement: 80 % of entries exactly 0 or 1, the rest uniform."""
    decided = np.float32(rng.random(shape) < 0.5)
    return np.where(rng.random(shape) < 0.8, decided, rng.random(shape)).astype(np.float32)


def test_coding_against_theta_costs_the_masks_cross_entropy() -> None:
    """Codec 21 codes entry i as Bernoulli(clip(theta_i)): a mask drawn from theta costs its
    cross-entropy, far below H(density) = 1 bit when most entries are decided; against a theta
    that says nothing (1/2 everywhere) it would cost more than packing, so the client packs."""
    spec = ModelSpec((TensorSpec("w.weight", (200, 500)),))
    rng = np.random.default_rng(0)
    theta = _decided_theta(rng, (200, 500))
    mask = rng.random((200, 500)) < theta
    p = np.clip(theta.astype(np.float64), THETA_CLIP, 1 - THETA_CLIP)
    cross_entropy = -np.where(mask, np.log2(p), np.log2(1 - p)).mean()
    bits = {}
    for coding in ("density", "theta"):
        payload = encode_fedpm_mask(spec, {"w.weight": mask}, {}, {}, coding=coding,
                                    theta={"w.weight": theta})  # fmt: skip
        bits[coding] = 8 * payload["code"].nbytes / 100_000
    assert bits["theta"] == pytest.approx(cross_entropy, rel=0.01)
    assert bits["theta"] < 0.2 * bits["density"]
    chosen = encode_masks(spec, {"w.weight": mask}, {}, {}, "theta", {"w.weight": theta})
    assert int(chosen["header"][2]) == FEDPM_THETA_CODED_ID
    uniform = {"w.weight": np.full((200, 500), 0.5, np.float32)}  # 1 bit an entry + framing
    chosen = encode_masks(spec, {"w.weight": mask}, {}, {}, "theta", uniform)
    assert int(chosen["header"][2]) == FEDPM_MASK_ID


def test_theta_coded_reply_decodes_only_against_the_theta_sent() -> None:
    """The server part decodes codec 21 with the theta of its own downlink: a reply coded
    against another theta is rejected; an unresolved reply refuses to be summed."""
    spec = ModelSpec((TensorSpec("w.weight", (40, 50)), TensorSpec("bn.running_var", (2,),
                      kind="stat", domain="log")))  # fmt: skip
    reference = {
        "w.weight": np.ones((40, 50), np.float32),
        "bn.running_var": np.ones(2, np.float32),
    }
    rng = np.random.default_rng(3)
    part = FedPMPart(spec, reference, prior_reset=1, seed=0)
    glob = {**part.initial(reference), "w.weight": _decided_theta(rng, (40, 50))}
    sent = validate_fedpm_probs(part.payload(glob, 1), spec).theta
    mask = rng.random((40, 50)) < sent["w.weight"]

    def reply(theta: np.ndarray):
        payload = encode_fedpm_mask(
            spec, {"w.weight": mask}, {"bn.running_var": np.ones(2, bool)},
            {"bn.running_var": 0.0}, coding="theta", theta={"w.weight": theta},
        )  # fmt: skip
        assert int(payload["header"][2]) == FEDPM_THETA_CODED_ID
        return decode_payload("fedpm-mask", payload, spec, BOUNDS)

    honest = reply(sent["w.weight"])
    with pytest.raises(ValueError, match="resolved"):
        honest.delta()
    part.check(honest, 1)
    new = part.aggregate(glob, [(10, honest)], 1)
    np.testing.assert_array_equal(new["w.weight"], mask)  # mode of Beta(1, 1) + one mask
    with pytest.raises(PayloadError) as info:  # coded against the mask itself as theta
        part.check(reply(np.float32(mask)), 1)
    assert info.value.field == "code"


def test_theta_coded_counts_are_bounded_by_the_clip() -> None:
    """A codec-21 tensor may cost up to 10 bits an entry (the clip), not more."""
    spec = ModelSpec((TensorSpec("w.weight", (40, 50)),))
    rng = np.random.default_rng(2)
    theta = {"w.weight": _decided_theta(rng, (40, 50))}
    mask = {"w.weight": rng.random((40, 50)) < theta["w.weight"]}
    payload = encode_fedpm_mask(spec, mask, {}, {}, coding="theta", theta=theta)
    payload["counts"][1, 0] = 2000 * 10 // 32 + 17
    with pytest.raises(PayloadError, match="code words=642") as info:
        validate_fedpm_coded(payload, spec, BOUNDS)
    assert info.value.field == "counts"


def _coded() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    spec = ModelSpec((TensorSpec("w.weight", (40, 50)),))
    return encode_fedpm_mask(
        spec, {"w.weight": rng.random((40, 50)) < 0.1}, {}, {}, coding="density"
    )


CODED_SPEC = ModelSpec((TensorSpec("w.weight", (40, 50)),))


@pytest.mark.parametrize(
    ("change", "field", "match"),
    [
        (lambda p: p["counts"].__setitem__((0, 0), p["counts"][0, 0] + 1), "code", "ones"),
        (lambda p: p["counts"].__setitem__((0, 0), 2001), "counts", "ones=2001"),
        (lambda p: p["counts"].__setitem__((1, 0), 5000), "counts", "code words"),
        (lambda p: p.__setitem__("code", np.full_like(p["code"], 0xFFFFFFFF)), "code", None),
    ],
)
def test_coded_mask_rejects_inconsistent_counts_and_bad_codes(
    change, field: str, match: str | None
) -> None:
    payload = _coded()
    change(payload)
    with pytest.raises(PayloadError, match=match) as info:
        validate_fedpm_coded(payload, CODED_SPEC, BOUNDS)
    assert info.value.field == field


def test_probability_downlink_round_trip_and_range() -> None:
    theta = {"conv.weight": np.array([[0.0, 0.25, 1.0]], np.float32)}
    payload = encode_fedpm_probs(SPEC, theta, {"bn.running_var": np.array([2.0, 0.5])})
    probs = validate_fedpm_probs(record_to_payload(payload_to_record(payload)), SPEC)
    np.testing.assert_array_equal(probs.theta["conv.weight"], theta["conv.weight"])
    np.testing.assert_array_equal(probs.stats["bn.running_var"], [2.0, 0.5])
    payload["theta"][1] = 1.5
    with pytest.raises(PayloadError, match=r"\[0, 1\]"):
        validate_fedpm_probs(payload, SPEC)


# --- client -------------------------------------------------------------------------------


def test_sampled_mask_forward_and_straight_through_gradient() -> None:
    score = torch.tensor([3.0, -3.0, 0.0])
    part = SampledMask(score.clone(), torch.Generator().manual_seed(0))
    w = torch.tensor([2.0, 3.0, -1.0])
    out = part(w)
    assert set((out / w).tolist()) <= {0.0, 1.0}
    g = torch.tensor([1.0, -2.0, 0.5])
    (out * g).sum().backward()
    sig = torch.sigmoid(score)
    torch.testing.assert_close(part.score.grad, w * g * sig * (1 - sig))


def test_reference_network_is_seeded_signed_constants() -> None:
    config = RunConfig(method="fedpm", seed=3)
    ref = reference_weights(config)
    assert ref is reference_weights(config.replace(lr=0.5))  # cached by what defines it
    w = ref["features.4.weight"]  # conv 32 -> 64, fan_in 288
    np.testing.assert_allclose(np.unique(np.abs(w)), [math.e / math.sqrt(32 * 9)], rtol=1e-6)
    assert 0.45 < (w > 0).mean() < 0.55
    assert not np.array_equal(
        ref["features.4.weight"], reference_weights(config.replace(seed=4))["features.4.weight"]
    )


@pytest.mark.parametrize(
    ("coding", "extra", "codec_id"),
    [
        ("packed", {}, 19),
        ("density", {"fedpm-entropy-coding": True}, 20),
        ("theta", {"fedpm-entropy-coding": True, "fedpm-coding-model": "theta"}, 21),
    ],
)
def test_client_round_sends_a_mask_the_rule_aggregates(
    coding: str, extra: dict[str, object], codec_id: int
) -> None:
    config = RunConfig(method="fedpm", local_epochs=2, extra={**extra, "fedpm-reg": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 256, bias=False), nn.BatchNorm1d(256))
    spec = model_spec(model)
    reference = state_arrays(model)
    part = FedPMPart(spec, reference, prior_reset=1, seed=0)
    glob = {
        **part.initial(reference),
        "1.weight": _decided_theta(np.random.default_rng(4), (256, 4)),
    }
    down = record_to_payload(payload_to_record(part.payload(glob, 1)))
    method = get_method("fedpm")(config)
    state: dict[str, np.ndarray] = {}
    global_state = {**reference, **validate_fedpm_probs(down, spec).stats}
    load_state(model, global_state)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 2, 2, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    task = LocalTask(
        model, global_state, spec, TensorBatches(x, y, 8, gen), config, CPU, 5, 1, state, down
    )
    update = method.train(task)
    assert int(update.payload["header"][2]) == codec_id
    decoded = decode_payload("fedpm-mask", update.payload, spec, BOUNDS)
    part.check(decoded, 1)
    assert 0.0 <= update.metrics["mask-density"] <= 1.0
    new = part.aggregate(glob, [(32, decoded)], 1)
    mask = decoded.resolved(part.sent.theta).view.mask("1.weight").reshape(256, 4)
    np.testing.assert_allclose(new["1.weight"], mask)  # mode of Beta(1, 1) + one mask
    decided = np.isin(glob["1.weight"], (0.0, 1.0))
    assert (mask[decided] == glob["1.weight"][decided]).mean() > 0.95  # 8 Adam steps from +-6.9
    assert all(p.requires_grad for p in task.model.parameters())  # the model is left as found
    assert not any("parametrizations" in k for k in task.model.state_dict())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fedpm-lr", 0.0),
        ("fedpm-reg", -1.0),
        ("fedpm-prior-reset", 0),
        ("fedpm-entropy-coding", 1),
        ("fedpm-theta", "median"),
        ("fedpm-coding-model", "huffman"),
        ("fedpm-theta-eps", 0.0),
        ("fedpm-theta-eps", 0.5),
    ],
)
def test_bad_options_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        get_method("fedpm")(RunConfig(extra={key: value}))


def test_coding_against_theta_needs_entropy_coding() -> None:
    with pytest.raises(ConfigError, match="'fedpm-coding-model' = 'theta' needs"):
        get_method("fedpm")(RunConfig(extra={"fedpm-coding-model": "theta"}))
    on = {"fedpm-coding-model": "theta", "fedpm-entropy-coding": True}
    assert get_method("fedpm")(RunConfig(extra=on)).coding == "theta"

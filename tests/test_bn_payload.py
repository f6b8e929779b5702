"""`bn-payload`: how BatchNorm travels for the 1-bit methods (binary, float16, float32).

The mixed codec (wire/mixed.py) round trip and every rejection, what each method puts in it,
and the run-config checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.records import payload_to_record, record_to_payload
from fedbat_flwr.wire import AlphaBounds, ModelSpec, PayloadError, TensorSpec, decode_payload
from fedbat_flwr.wire.mixed import encode_mixed, validate_mixed
from fedbat_flwr.wire.signs import encode_signs
from fedbat_flwr.wire.votes import majority_vote, sign_median
from tests.test_methods import run, tiny_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOUNDS = AlphaBounds(param=(5e-4, 5e-2), stat=(0.0, 20.0))
SIGN_METHODS = ("fedbat", "signsgd", "ef-signsgd", "noisy-signsgd", "stoc-signsgd")
SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (4, 3, 3, 3)),
        TensorSpec("bn.weight", (4,)),
        TensorSpec("bn.bias", (4,)),
        TensorSpec("bn.running_mean", (4,), "stat"),
        TensorSpec("bn.running_var", (4,), "stat", "log"),
        TensorSpec("fc.weight", (2, 4)),
    )
)
MATRICES = ("conv.weight", "fc.weight")
FLOATS = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


def _parts(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    bits = {n: rng.random(SPEC[n].shape) < 0.5 for n in MATRICES}
    alphas = {n: float(rng.uniform(5e-4, 5e-2)) for n in MATRICES}
    dense = {n: (scale * rng.standard_normal(SPEC[n].shape)).astype(np.float32) for n in FLOATS}
    return bits, alphas, dense


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), width=st.sampled_from([16, 32]))
def test_mixed_round_trip_through_flower_records(seed: int, width: int) -> None:
    bits, alphas, dense = _parts(seed)
    payload = record_to_payload(payload_to_record(encode_mixed(SPEC, bits, alphas, dense, width)))
    delta = decode_payload("signs", payload, SPEC, BOUNDS).delta()
    for n in MATRICES:
        a = np.float32(alphas[n])
        np.testing.assert_array_equal(delta[n], np.where(bits[n], a, -a))
    for n in FLOATS:
        expected = dense[n].astype(np.float16 if width == 16 else np.float32).astype(np.float32)
        np.testing.assert_array_equal(delta[n], expected)


def test_mixed_payload_costs_float_width_for_batchnorm_only() -> None:
    bits, alphas, dense = _parts(0)
    for width in (16, 32):
        payload = encode_mixed(SPEC, bits, alphas, dense, width)
        assert payload["dense"].nbytes == 16 * width // 8
        assert payload["signs"].nbytes == 14 + 1  # ceil(108 / 8) conv bytes + 1 fc byte
        assert payload["header"].tolist() == [70, 66, 5, 1, width]


def _bad(mutate) -> dict[str, np.ndarray]:
    bits, alphas, dense = _parts(1)
    payload = {k: v.copy() for k, v in encode_mixed(SPEC, bits, alphas, dense, 32).items()}
    mutate(payload)
    return payload


BAD = {
    "nan": (lambda p: p["dense"].__setitem__(0, np.nan), "bn.weight", "non-finite"),
    "inf": (lambda p: p["dense"].__setitem__(5, np.inf), "bn.bias", "non-finite"),
    "too large": (lambda p: p["dense"].__setitem__(12, 20.5), "bn.running_var", "stat-alpha-max"),
    "short": (lambda p: p.__setitem__("dense", p["dense"][:-1]), None, "length=15"),
    "width 8": (lambda p: p["header"].__setitem__(4, 8), None, "float width=8"),
    "dtype vs width": (
        lambda p: p.__setitem__("dense", p["dense"].astype(np.float16)),
        None,
        "as the header declares",
    ),
    "2-D dense": (lambda p: p.__setitem__("dense", p["dense"].reshape(4, 4)), None, "1-D"),
    "extra key": (lambda p: p.__setitem__("more", np.zeros(1, np.uint8)), None, "unexpected"),
    "missing key": (lambda p: p.pop("alphas"), None, "missing"),
    "alpha": (lambda p: p["alphas"].__setitem__(0, 1.0), "conv.weight", "out of range"),
    "version": (lambda p: p["header"].__setitem__(3, 2), None, "layout version=2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_mixed_payload_is_rejected_naming_the_field(case: str) -> None:
    mutate, tensor, words = BAD[case]
    with pytest.raises(PayloadError, match=words) as info:
        decode_payload("signs", _bad(mutate), SPEC, BOUNDS)
    assert info.value.layer == tensor


def test_float_batchnorm_is_bounded_like_a_binary_statistic() -> None:
    """|entry| <= stat-alpha-max for a statistic, max-update-entry for an affine value (the
    bounds of k-bit and sparse updates); a variance update stays a ratio > 0."""
    bits, alphas, dense = _parts(2)
    dense["bn.running_var"][:] = -20.0  # the largest allowed shrink
    decoded = decode_payload("signs", encode_mixed(SPEC, bits, alphas, dense, 32), SPEC, BOUNDS)
    weights = {t.name: np.full(t.shape, 1e-3, np.float32) for t in SPEC}
    assert (SPEC.apply(weights, decoded.delta())["bn.running_var"] > 0).all()
    dense["bn.weight"][0] = 5.5
    with pytest.raises(PayloadError, match="max-update-entry"):
        validate_mixed(encode_mixed(SPEC, bits, alphas, dense, 32), SPEC, BOUNDS)


@pytest.mark.parametrize("bn_payload", ["float16", "float32"])
@pytest.mark.parametrize("name", SIGN_METHODS)
def test_float_bn_payload_sends_batchnorm_updates_as_trained(name: str, bn_payload: str) -> None:
    """Linear weight 1 bit + alpha; BatchNorm affine and statistics = the model's float update."""
    task = tiny_task(RunConfig(lr=0.5, bn_payload=bn_payload))
    update, m, decoded = run(name, task)
    assert update.payload["header"][2] == 5
    out = decoded.delta()
    w = out["1.weight"]
    assert np.unique(np.abs(w)).size == 1  # one alpha, every entry +-alpha
    tol = {"float16": 2e-3, "float32": 0.0}[bn_payload]
    for key in ("2.weight", "2.bias", "2.running_mean", "2.running_var"):
        np.testing.assert_allclose(out[key], m[key], rtol=tol, atol=tol * 1e-2)
    assert np.unique(np.abs(out["2.weight"])).size > 1  # not a 1-bit tensor


def test_binary_bn_payload_is_all_one_bit() -> None:
    for name in SIGN_METHODS:
        update, _, decoded = run(name, tiny_task(RunConfig(lr=0.5, bn_payload="binary")))
        assert update.payload["header"][2] == 1
        for value in decoded.delta().values():
            assert np.unique(np.abs(value)).size == 1


def test_fedbat_trains_batchnorm_affine_in_full_precision_with_float_bn_payload() -> None:
    """bn-payload float: only >= 2-D weights see S(m, alpha); BatchNorm affine trains plainly."""
    task = tiny_task(RunConfig(lr=0.5, bn_payload="float32"))
    before = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    _, m, _ = run("fedbat", task)
    after = task.model.state_dict()
    torch.testing.assert_close(after["1.weight"], before["1.weight"])  # binarized: base frozen
    assert not torch.equal(after["2.weight"], before["2.weight"])  # plain: trained in place
    assert not m["1.weight"].any()


def test_ef_signsgd_keeps_no_residual_for_float_batchnorm() -> None:
    task = tiny_task(RunConfig(lr=0.5, bn_payload="float16"))
    run("ef-signsgd", task)
    assert set(task.state) == {"1.weight"}


def test_bn_payload_is_a_checked_run_config_key() -> None:
    assert RunConfig.from_flower({"bn-payload": "float16"}).bn_payload == "float16"
    with pytest.raises(ConfigError, match=r"'bn-payload' = 'float8'.*'binary', 'float16'"):
        RunConfig.from_flower({"bn-payload": "float8"})
    assert RunConfig().bn_payload == "float16"  # the default (README "How BatchNorm travels")
    for aggregator in ("majority", "sign-median"):  # votes take float tensors' median
        config = RunConfig.from_flower({"bn-payload": "float32", "aggregator": aggregator})
        assert config.aggregator == aggregator


def _views(seeds: list[int]) -> list:
    views = []
    for seed in seeds:
        bits, alphas, dense = _parts(seed)
        views.append(validate_mixed(encode_mixed(SPEC, bits, alphas, dense, 32), SPEC, BOUNDS))
    return views


def test_votes_over_float_batchnorm_take_its_coordinate_wise_median() -> None:
    """Majority: conv / linear tensors by the vote of their bits (step: median alpha), float
    BatchNorm by the median; sign-median: the median of every tensor's decoded update."""
    views = _views([1, 2, 3])
    voted = majority_vote(SPEC, views)
    median = sign_median(SPEC, views)
    deltas = [decode_payload("signs", _payload(s), SPEC, BOUNDS).delta() for s in (1, 2, 3)]
    for n in FLOATS:
        expected = np.median(np.stack([d[n] for d in deltas]), axis=0)
        np.testing.assert_array_equal(voted[n], expected.astype(np.float32))
        np.testing.assert_array_equal(median[n], expected.astype(np.float32))
    for n in MATRICES:
        signs = np.sign(sum(np.sign(d[n]) for d in deltas))
        step = np.median([v.signs.alphas[v.signs.spec.names.index(n)] for v in views])
        np.testing.assert_array_equal(voted[n], (np.float32(step) * signs).astype(np.float32))
        expected = np.median(np.stack([d[n] for d in deltas]), axis=0)
        np.testing.assert_allclose(median[n], expected, rtol=1e-7)


def test_a_tensor_some_replies_send_as_floats_is_not_voted_on() -> None:
    """A reply with 1-bit BatchNorm beside float ones: BatchNorm takes the median of the
    decoded updates, conv / linear tensors still the vote."""
    all_signs = {n: np.ones(SPEC[n].shape, bool) for n in SPEC.names}
    alphas = {n: 0.01 for n in SPEC.names}
    pure = decode_payload("signs", encode_signs(SPEC, all_signs, alphas), SPEC, BOUNDS).view
    views = [*_views([4, 5]), pure]
    voted = majority_vote(SPEC, views)
    assert set(voted) == set(SPEC.names)
    median = sign_median(SPEC, views)
    for n in FLOATS:
        np.testing.assert_array_equal(voted[n], median[n])


def _payload(seed: int) -> dict[str, np.ndarray]:
    bits, alphas, dense = _parts(seed)
    return encode_mixed(SPEC, bits, alphas, dense, 32)

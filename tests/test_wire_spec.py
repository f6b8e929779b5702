"""ModelSpec / TensorSpec / AlphaBounds: what the server expects, and update domains."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from fedbat_flwr.wire import AlphaBounds, ModelSpec, TensorSpec

SHAPES = array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


def _resnet_like() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.zeros((4, 3, 3, 3), np.float32),
        "bn.weight": np.ones(4, np.float32),
        "bn.bias": np.zeros(4, np.float32),
        "bn.running_mean": np.zeros(4, np.float32),
        "bn.running_var": np.ones(4, np.float32),
        "fc.weight": np.zeros((10, 4), np.float32),
    }


# --- TensorSpec / ModelSpec -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size"), [((), 1), ((0,), 0), ((3, 0), 0), ((1,), 1), ((2, 3, 4), 24)]
)
def test_tensor_size(shape: tuple[int, ...], size: int) -> None:
    assert TensorSpec("t", shape).size == size


def test_tensor_shape_is_normalised_to_python_ints() -> None:
    t = TensorSpec("t", [np.int64(2), 3])  # type: ignore[arg-type]
    assert t.shape == (2, 3) and all(type(s) is int for s in t.shape)
    assert t == TensorSpec("t", (2, 3)) and hash(t) == hash(TensorSpec("t", (2, 3)))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "", "shape": (1,)}, "name=''"),
        ({"name": "t", "shape": (-1,)}, "shape=(-1,)"),
        ({"name": "t", "shape": (1.5,)}, "shape=(1.5,)"),
        ({"name": "t", "shape": (1,), "kind": "buffer"}, "kind='buffer'"),
        ({"name": "t", "shape": (1,), "domain": "exp"}, "domain='exp'"),
    ],
)
def test_tensor_spec_rejects_bad_fields(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        TensorSpec(**kwargs)


def test_from_arrays_keeps_order_and_sets_kind_and_domain() -> None:
    spec = ModelSpec.from_arrays(_resnet_like())
    assert spec.names == tuple(_resnet_like())
    assert [(t.kind, t.domain) for t in spec] == [
        ("param", "linear"),
        ("param", "linear"),
        ("param", "linear"),
        ("stat", "linear"),
        ("stat", "log"),
        ("param", "linear"),
    ]
    assert spec.num_params == 108 + 4 * 4 + 40
    assert len(spec) == 6
    assert spec["bn.running_var"] == TensorSpec("bn.running_var", (4,), "stat", "log")


def test_from_arrays_custom_stat_suffixes() -> None:
    spec = ModelSpec.from_arrays(_resnet_like(), stat_suffixes=("running_var",))
    assert spec["bn.running_mean"].kind == "param"
    assert spec["bn.running_var"].kind == "stat"


def test_model_spec_lookup_and_duplicates() -> None:
    spec = ModelSpec((TensorSpec("a", (2,)), TensorSpec("b", ())))
    with pytest.raises(KeyError, match="'c'"):
        spec["c"]
    with pytest.raises(ValueError, match="'a' appears twice"):
        ModelSpec((TensorSpec("a", (2,)), TensorSpec("a", (3,))))
    assert ModelSpec([TensorSpec("a", (2,))]).tensors == (TensorSpec("a", (2,)),)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(st.lists(SHAPES, max_size=8))
def test_num_params_is_sum_of_sizes(shapes: list[tuple[int, ...]]) -> None:
    spec = ModelSpec(tuple(TensorSpec(f"t{i}", s) for i, s in enumerate(shapes)))
    assert spec.num_params == sum(math.prod(s) for s in shapes)
    assert list(spec) == list(spec.tensors)


# --- delta / apply ---------------------------------------------------------------------------


def _spec_and_states(
    shapes: list[tuple[int, ...]], seed: int
) -> tuple[ModelSpec, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Alternate linear and log tensors; log tensors hold positive values."""
    rng = np.random.default_rng(seed)
    tensors, old, new = [], {}, {}
    for i, shape in enumerate(shapes):
        log = i % 2 == 1
        if log:
            tensors.append(TensorSpec(f"l{i}.running_var", shape, "stat", "log"))
        else:
            tensors.append(TensorSpec(f"l{i}.weight", shape))
        name = tensors[-1].name
        if log:
            old[name] = rng.uniform(0.1, 10.0, shape).astype(np.float32)
            new[name] = rng.uniform(0.1, 10.0, shape).astype(np.float32)
        else:
            old[name] = rng.standard_normal(shape).astype(np.float32)
            new[name] = rng.standard_normal(shape).astype(np.float32)
    return ModelSpec(tuple(tensors)), new, old


@settings(max_examples=100, deadline=None)
@given(st.lists(SHAPES, min_size=1, max_size=6), st.integers(0, 2**32 - 1))
def test_apply_of_delta_round_trips(shapes: list[tuple[int, ...]], seed: int) -> None:
    spec, new, old = _spec_and_states(shapes, seed)
    new_copy = {k: v.copy() for k, v in new.items()}
    old_copy = {k: v.copy() for k, v in old.items()}
    delta = spec.delta(new, old)
    back = spec.apply(old, delta)
    for t in spec:
        assert delta[t.name].dtype == np.float32 and delta[t.name].shape == t.shape
        assert back[t.name].dtype == np.float32 and back[t.name].shape == t.shape
        np.testing.assert_allclose(back[t.name], new[t.name], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(new[t.name], new_copy[t.name])  # inputs untouched
        np.testing.assert_array_equal(old[t.name], old_copy[t.name])
        assert back[t.name] is not old[t.name]


def test_delta_uses_each_domain() -> None:
    spec = ModelSpec((TensorSpec("w", (2,)), TensorSpec("v", (2,), "stat", "log")))
    new = {"w": np.array([3.0, 1.0]), "v": np.array([np.e, 1.0]), "num_batches_tracked": 7}
    old = {"w": np.array([1.0, 1.0]), "v": np.array([1.0, np.e])}
    delta = spec.delta(new, old)
    np.testing.assert_allclose(delta["w"], [2.0, 0.0])
    np.testing.assert_allclose(delta["v"], [1.0, -1.0], rtol=1e-6)
    assert set(delta) == {"w", "v"}  # extra keys are ignored


def test_log_domain_keeps_variance_positive_under_any_sign() -> None:
    spec = ModelSpec((TensorSpec("v", (3,), "stat", "log"),))
    out = spec.apply({"v": np.full(3, 1e-3, np.float32)}, {"v": np.array([-10.0, 0.0, 10.0])})
    assert np.all(out["v"] > 0)
    np.testing.assert_allclose(out["v"], 1e-3 * np.exp([-10.0, 0.0, 10.0]), rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_log_delta_rejects_non_positive(bad: float) -> None:
    spec = ModelSpec((TensorSpec("bn.running_var", (2,), "stat", "log"),))
    with pytest.raises(ValueError, match=r"'bn.running_var'.*value=.*allowed: finite, > 0"):
        spec.delta({"bn.running_var": np.array([1.0, bad])}, {"bn.running_var": np.ones(2)})


def test_delta_and_apply_name_missing_or_misshapen_tensors() -> None:
    spec = ModelSpec((TensorSpec("w", (2,)),))
    with pytest.raises(ValueError, match="new: tensor 'w' is missing"):
        spec.delta({}, {"w": np.zeros(2)})
    with pytest.raises(ValueError, match=r"old: tensor 'w' has shape=\(3,\) \(allowed: \(2,\)\)"):
        spec.delta({"w": np.zeros(2)}, {"w": np.zeros(3)})
    with pytest.raises(ValueError, match="delta: tensor 'w' is missing"):
        spec.apply({"w": np.zeros(2)}, {})


# --- AlphaBounds -----------------------------------------------------------------------------


def test_alpha_bounds_defaults_and_for_tensor() -> None:
    b = AlphaBounds()
    assert b.for_tensor(TensorSpec("w", (1,))) == (5e-4, 5e-2)
    assert b.for_tensor(TensorSpec("v", (1,), "stat", "log")) == (0.0, 20.0)


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0, 1e6))
def test_alpha_bounds_accepts_any_ordered_non_negative_pair(a, b, c, d) -> None:
    bounds = AlphaBounds(param=(min(a, b), max(a, b)), stat=(min(c, d), max(c, d)))
    assert bounds.param == (min(a, b), max(a, b))
    assert bounds.stat == (min(c, d), max(c, d))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"param": (0.1, 0.01)}, r"param: lo=0.1 > hi=0.01"),
        ({"stat": (-1.0, 1.0)}, r"stat: lo=-1.0 \(allowed: lo >= 0\)"),
        ({"param": (0.0, float("nan"))}, r"param=\(0.0, nan\) are not finite"),
        ({"stat": (0.0, float("inf"))}, r"stat=\(0.0, inf\) are not finite"),
        ({"param": (0.1,)}, r"param=\(0.1,\) \(allowed: a pair"),
        ({"param": ("a", 1.0)}, r"param=\('a', 1.0\) \(allowed: a pair"),
    ],
)
def test_alpha_bounds_rejects_bad_ranges(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        AlphaBounds(**kwargs)

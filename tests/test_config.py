"""The run config: parsed once, bad values refused with the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedbat_flwr.config import (
    BN_PAYLOADS,
    DATASETS,
    MODELS,
    NUM_EXAMPLES_POLICIES,
    PARTITIONERS,
    ConfigError,
    RunConfig,
)

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_pyproject_defaults_parse_and_match_the_paper_where_they_fit():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    config = RunConfig.from_flower(table)
    assert (config.method, config.dataset) == ("fedbat", "fashion_mnist")
    assert (config.rho, config.phi, config.lr, config.batch_size) == (6.0, 0.5, 0.1, 64)
    assert (config.alpha_min, config.alpha_max) == (5e-4, 5e-2)
    assert config.to_flower()["num-server-rounds"] == table["num-server-rounds"]


def test_toml_ints_are_accepted_for_floats():
    assert RunConfig.from_flower({"rho": 4}).rho == 4.0


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("dataset", "mnist", "'dataset' = 'mnist' is not allowed; allowed: 'fashion_mnist'"),
        ("partitioner", "random", "'partitioner' = 'random'"),
        ("phi", 1.5, "'phi' = 1.5 is out of range; allowed: [0.0, 1.0]"),
        ("lr", 0.0, "'lr' = 0.0 is out of range; allowed: (0.0, inf]"),
        ("alpha-max", 1e-5, "'alpha-max' = 1e-05 is out of range"),
        ("local-epochs", "2", "'local-epochs' = '2' has type str; allowed: int"),
        ("fraction-train", float("nan"), "'fraction-train' = nan is out of range"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, needle):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({key: value})
    assert needle in str(info.value)


def test_unknown_keys_go_to_extra_for_the_method_to_read():
    config = RunConfig.from_flower({"quant-bits": 3})
    assert config.get("quant-bits", 4) == 3 and config.get("other", 1.5) == 1.5


def test_model_auto_follows_the_paper():
    assert RunConfig(dataset="cifar10").model_name == "resnet10"
    assert RunConfig(dataset="svhn").model_name == "cnn4"


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("dataset", DATASETS),
        ("partitioner", PARTITIONERS),
        ("model", MODELS),
        ("num-examples-policy", NUM_EXAMPLES_POLICIES),
        ("bn-payload", BN_PAYLOADS),
    ],
)
def test_pyproject_comments_name_every_allowed_value(key: str, allowed: tuple[str, ...]):
    """The comment beside a choice key in pyproject.toml is what users read; config.py decides."""
    (line,) = [x for x in PYPROJECT.read_text().splitlines() if x.startswith(f"{key} = ")]
    comment = line.partition("#")[2]
    assert [a for a in allowed if a not in comment] == []


@pytest.mark.parametrize(
    ("key", "value"), [("fault-kind", "boom"), ("fault-partition", -3), ("fault-round", -1)]
)
def test_the_fault_hook_keys_are_checked_at_start_up(key: str, value: object) -> None:
    from fedbat_flwr.preflight import check_fault_hook

    with pytest.raises(ConfigError, match=f"'{key}' = {value!r} is not allowed"):
        check_fault_hook(RunConfig(extra={key: value}))


def test_cnn4_width_widens_every_layer_and_is_checked() -> None:
    from fedbat_flwr.task import build_model_for, model_spec

    narrow, wide = (model_spec(build_model_for(RunConfig(cnn4_width=w))) for w in (32, 64))
    assert wide["features.0.weight"].shape == (64, 1, 3, 3)
    assert wide["classifier.weight"].shape == (10, 512)
    assert 3.5 < wide.num_params / narrow.num_params < 4.5  # widths double: ~4x the weights
    with pytest.raises(ConfigError, match="'cnn4-width' = 48 is not allowed"):
        RunConfig(cnn4_width=48)

"""The run config, parsed and validated once.

Flower hands both apps `context.run_config`, a flat dict of the `[tool.flwr.app.config]` table
(with `--run-config` overrides). Everything downstream reads a `RunConfig` instead, so a bad value
fails once, at start-up, with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# The allowed values of the run config's choice keys; every other module reads them from here.
CUSTOM = "custom"  # a user's save_to_disk folder in data-dir
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "svhn", CUSTOM)  # data.py: DATASET_INFO
PARTITIONERS = ("iid", "dirichlet", "shard")
AUTO_MODEL = "auto"  # the paper's model for the data set (RunConfig.model_name)
MODELS = (AUTO_MODEL, "cnn4", "resnet10")  # training/models.py builds all but auto
NUM_EXAMPLES_POLICIES = ("cap", "reject")
BN_PAYLOADS = ("binary", "float16", "float32")
FAULT_KINDS = ("raise", "hang")  # the test hook's `fault-kind` (client_app.inject_fault)
DOWNLINK_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)  # wire/downlink.py; 32 = the float32 model


# The app folder: the checkout, or in a run the FAB Flower installed (pyproject.toml included).
APP_ROOT = Path(__file__).resolve().parent.parent


T = TypeVar("T")


class ConfigError(ValueError):
    """A run-config value is not allowed."""


def declared_defaults(app_dir: Path = APP_ROOT) -> dict[str, Any]:
    """Every run-config key the app declares, with its default: pyproject.toml's
    `[tool.flwr.app.config]` in `app_dir` (empty when the package runs without it)."""
    path = app_dir / "pyproject.toml"
    if not path.is_file():
        return {}
    with open(path, "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, with the paper's defaults (see pyproject.toml for the CPU ones)."""

    method: str = "fedbat"
    aggregator: str = "fedavg"
    model: str = AUTO_MODEL
    resnet_width: int = 32
    cnn4_width: int = 32  # CNN4's first width (paper: 32); 64 / 128 widen it 2x / 4x
    dataset: str = "fashion_mnist"
    data_dir: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.3
    labels_per_client: int = 3
    max_examples_per_client: int = 0
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    rho: float = 6.0
    phi: float = 0.5
    alpha_min: float = 5e-4
    alpha_max: float = 5e-2
    # How BatchNorm tensors travel for the 1-bit methods: float16 updates (as the authors' code,
    # in float32, does; README "How BatchNorm travels"), float32, or 1 bit + alpha ("binary").
    bn_payload: str = "float16"
    # Bits per conv / linear weight of the broadcast global model (32 = float32, no quantization).
    downlink_bits: int = 32
    stat_alpha_max: float = 20.0  # a refit first-layer running_var moves ~e^-10.4 in round 1
    # Largest |entry| of a parameter update whose size the client's data decides (EF-SignSGD
    # alpha, FedPAQ scale, top-k value, FedBiF's BatchNorm affine); an honest CNN4 update on
    # Fashion-MNIST stays under 0.44 (10 local epochs at lr 0.1).
    max_update_entry: float = 5.0
    max_num_examples: int = 1_000_000
    num_examples_policy: str = "cap"  # a claim above max-num-examples: "cap" it or "reject" it
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    resume_from: str = ""  # a run directory whose checkpoint.npz the run continues from
    seed: int = 42
    # torch intra-op threads of every ClientApp and the ServerApp (0 = torch's default). Float
    # sums are split by thread, so runs repeat exactly only at one thread count.
    torch_threads: int = 0
    output_dir: str = "outputs"
    run_name: str = ""
    eval_every: int = 1
    eval_batch_size: int = 1024
    max_test_examples: int = 0
    # Method-specific keys live in `extra` (validated by the method that reads them).
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("partitioner", self.partitioner, PARTITIONERS)
        if ":" not in self.model:  # else a user's "package.module:build_fn" (task.py builds it)
            _check_choice("model", self.model, MODELS)
        _check_choice("resnet-width", self.resnet_width, (32, 64))
        _check_choice("cnn4-width", self.cnn4_width, (32, 64, 128))
        for key in ("num_server_rounds", "local_epochs", "batch_size", "eval_every"):
            _check_range(key, getattr(self, key), lo=1)
        for key in ("max_examples_per_client", "max_test_examples", "torch_threads"):
            _check_range(key, getattr(self, key), lo=0)
        _check_range("min_train_nodes", self.min_train_nodes, lo=1)
        _check_range("max_num_examples", self.max_num_examples, lo=1)
        _check_choice("num_examples_policy", self.num_examples_policy, NUM_EXAMPLES_POLICIES)
        _check_range("round_timeout", self.round_timeout, lo=0.0, lo_open=True)
        _check_range("labels_per_client", self.labels_per_client, lo=1)
        _check_range("fraction_train", self.fraction_train, lo=0.0, hi=1.0, lo_open=True)
        _check_range("dirichlet_alpha", self.dirichlet_alpha, lo=0.0, lo_open=True)
        _check_range("lr", self.lr, lo=0.0, lo_open=True)
        _check_range("rho", self.rho, lo=0.0)
        _check_range("phi", self.phi, lo=0.0, hi=1.0)
        _check_range("alpha_min", self.alpha_min, lo=0.0, lo_open=True)
        _check_range("alpha_max", self.alpha_max, lo=self.alpha_min)
        _check_range("stat_alpha_max", self.stat_alpha_max, lo=0.0, lo_open=True)
        _check_range("max_update_entry", self.max_update_entry, lo=0.0, lo_open=True)
        _check_choice("bn_payload", self.bn_payload, BN_PAYLOADS)
        _check_choice("downlink_bits", self.downlink_bits, DOWNLINK_BITS)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat `run_config` (dashed keys); unknown keys go to `extra`."""
        defaults = {f.name: f.default for f in fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for raw_key, value in run_config.items():
            key = raw_key.replace("-", "_")
            if key not in defaults:
                extra[raw_key] = value
                continue
            values[key] = coerce(raw_key, value, type(defaults[key]))
        return cls(**values, extra=extra)

    def to_flower(self) -> dict[str, Any]:
        """The inverse of `from_flower`: flat, dashed keys (what metrics/summary record)."""
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        out.pop("extra")
        out.update(self.extra)
        return out

    def get(self, key: str, default: Any) -> Any:
        """A method-specific key from `extra`, coerced to the default's type."""
        if key not in self.extra:
            return default
        return coerce(key, self.extra[key], type(default))

    @property
    def model_name(self) -> str:
        if self.model != AUTO_MODEL:
            return self.model
        return "resnet10" if self.dataset.startswith("cifar") else "cnn4"

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def coerce(key: str, value: Any, kind: type) -> Any:
    """`value` as the type of `key`'s default. TOML gives ints for floats written without a dot;
    accept those (and integral floats for ints), refuse the rest naming the key."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"run-config '{key}' = {value!r} has type {type(value).__name__}; "
            f"allowed: {kind.__name__}"
        )
    return value


def option(config: RunConfig, key: str, default: T, ok: Callable[[T], bool], allowed: str) -> T:
    """A key of `RunConfig.extra` (a method's option, the test hook's keys), checked once; the
    error names the key, the value and what is allowed."""
    value = config.get(key, default)
    if not ok(value):
        raise ConfigError(f"run-config '{key}' = {value!r} is not allowed; allowed: {allowed}")
    return value


def _check_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ConfigError(
            f"run-config '{_dash(key)}' = {value!r} is not allowed; allowed: {names}"
            + did_you_mean(value, allowed)
        )


def did_you_mean(value: Any, allowed: Any) -> str:
    """'; did you mean 'x'?' for a string close to one of `allowed`, else ''."""
    choices = [a for a in allowed if isinstance(a, str)]
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_range(
    key: str,
    value: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> None:
    bad = isinstance(value, float) and not math.isfinite(value)
    if lo is not None:
        bad = bad or (value <= lo if lo_open else value < lo)
    if hi is not None:
        bad = bad or value > hi
    if bad:
        left = "(" if lo_open else "["
        allowed = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(
            f"run-config '{_dash(key)}' = {value!r} is out of range; allowed: {allowed}"
        )


def _dash(key: str) -> str:
    return key.replace("_", "-")


def check_keys(overrides: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """Refuse run-config keys the app does not declare (with a did-you-mean) and values whose
    type does not fit the key's default, before Flower starts.

    `known` is pyproject's `[tool.flwr.app.config]` table: Flower refuses any other key, but only
    after its SuperLink has started and without naming the key.
    """
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"run-config key '{key}' is unknown; {hint}every key and its default is in "
                "[tool.flwr.app.config] of pyproject.toml"
            )
        coerce(key, value, type(known[key]))

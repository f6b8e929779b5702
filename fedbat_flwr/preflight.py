"""Start-up checks: everything about a run that can be known before round 1.

The ServerApp runs `check_startup` before it builds anything, so a bad method option, a data-dir
without data or an output-dir that cannot be written stops the run before round 1 even through
plain `flwr run`, and no results folder is made. The local runners (scripts/run_local.sh,
scripts/deploy_local.py, fedbat-sweep) run `preflight` before they start Flower: it adds what
only they know (the keys typed on the command line, the number of SuperNodes) and fails in
seconds instead of after Flower's start-up. Every error is a ConfigError naming the run-config
key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import FAULT_KINDS, ConfigError, RunConfig, check_keys, did_you_mean, option
from .results import (
    TENSORBOARD_KEY,
    CheckpointError,
    check_resumable,
    holds_results,
    load_checkpoint,
)

if TYPE_CHECKING:
    from .methods import Method

NODE_WAIT_KEY = "node-wait-timeout"
NODE_WAIT_DEFAULT = 60.0  # seconds; pyproject.toml holds the same default


def preflight(
    overrides: Mapping[str, Any], known: Mapping[str, Any], *, num_nodes: int | None
) -> RunConfig:
    """The run config `overrides` + the app's defaults `known`, checked as far as possible."""
    check_keys(overrides, known)
    config = RunConfig.from_flower({**known, **overrides})
    check_startup(config, num_nodes=num_nodes)
    return config


def check_startup(config: RunConfig, *, num_nodes: int | None = None) -> Method:
    """What the ServerApp checks before round 1 (`num_nodes` only when it is known); the
    method, instantiated once with every option checked."""
    method = check_method(config)
    check_data(config, num_partitions=num_nodes or 1)
    check_model(config)
    check_output(config)
    check_tracking(config)
    node_wait_timeout(config)
    check_fault_hook(config)
    if num_nodes is not None:
        check_nodes(config, num_nodes)
    return method


def check_fault_hook(config: RunConfig) -> None:
    """The test hook's keys (client_app.inject_fault), checked before any ClientApp runs."""
    checks = (
        ("fault-partition", -1, lambda v: v >= -1, "an int >= -1 (-1 = off)"),
        ("fault-round", 0, lambda v: v >= 0, "an int >= 0 (0 = every round)"),
        ("fault-kind", "raise", lambda v: v in FAULT_KINDS, ", ".join(map(repr, FAULT_KINDS))),
    )
    for key, default, ok, allowed in checks:
        option(config, key, default, ok, allowed)


def check_nodes(config: RunConfig, num_nodes: int) -> None:
    """Flower would wait for min-train-nodes SuperNodes; with fewer it would wait forever."""
    if config.min_train_nodes > num_nodes:
        raise ConfigError(
            f"run-config 'min-train-nodes' = {config.min_train_nodes} needs that many "
            f"SuperNodes, but the federation has {num_nodes}; allowed: [1, {num_nodes}] "
            "(or start more SuperNodes)"
        )


def check_method(config: RunConfig) -> Method:
    """Instantiate the method, which checks every option it reads, and its aggregator's name;
    then every other method's options (`check_other_options`).

    The instance is the one the ServerApp uses for the whole run (`Method.server_part`)."""
    from .aggregators import check_aggregator
    from .methods import get_method, method_names  # torch: only once the cheap checks passed

    try:
        method_class = get_method(config.method)
    except ValueError as exc:
        raise ConfigError(f"{exc}{did_you_mean(config.method, method_names())}") from None
    method = method_class(config)
    check_aggregator(
        method.aggregator(config), payload_kind=method.payload_kind, method=config.method
    )
    check_other_options(config)
    return method


def check_other_options(config: RunConfig) -> None:
    """Every option of the methods the run did not choose, as the method that reads it would
    check it: a value no method accepts (`topk-density = 5`) never starts a run."""
    from .methods import get_method, method_names

    for name in method_names():
        if name == config.method:
            continue
        try:
            get_method(name).check_options(config)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (an option of method {name!r})") from None


def unread_options(config: RunConfig, defaults: Mapping[str, Any]) -> list[str]:
    """One warning per method option set away from its default in `defaults` (pyproject's
    table) that the chosen method does not read, naming the methods that do read it."""
    from .methods import get_method, method_names

    readers: dict[str, list[str]] = {}
    for name in method_names():
        for key in get_method(name).options:
            readers.setdefault(key, []).append(name)
    values = config.to_flower()
    warnings = []
    for key, names in readers.items():
        if config.method in names or key not in defaults or values.get(key) == defaults[key]:
            continue
        methods = ", ".join(repr(n) for n in names)
        only = "method" if len(names) == 1 else "methods"
        warnings.append(
            f"run-config key {key!r} is read only by {only} {methods}; "
            f"method {config.method!r} ignores it"
        )
    return warnings


def check_data(config: RunConfig, *, num_partitions: int) -> None:
    """Data keys against the data set (its number of classes) and data-dir against the disk.

    Only where the data comes from is checked, nothing is loaded: a Hub data set is found (or
    not) when the run loads it.
    """
    from .data import CUSTOM, DataFormatError, DataUnavailableError, dataset_info, info_for
    from .task import data_config

    if config.seed < 0:
        raise ConfigError(f"run-config 'seed' = {config.seed} is out of range; allowed: >= 0")
    if config.dataset != CUSTOM:  # before DataConfig, whose message names its own field
        _check_labels(config, dataset_info(config.dataset).num_classes)
    try:
        info = info_for(data_config(config, num_partitions))
    except (DataUnavailableError, DataFormatError) as exc:
        raise ConfigError(f"run-config {exc}") from None
    except ValueError as exc:  # DataConfig's own checks
        raise ConfigError(f"run-config: {exc}") from None
    _check_labels(config, info.num_classes)


def _check_labels(config: RunConfig, num_classes: int) -> None:
    if config.labels_per_client > num_classes:
        raise ConfigError(
            f"run-config 'labels-per-client' = {config.labels_per_client} is more than "
            f"dataset {config.dataset!r} has; allowed: [1, {num_classes}]"
        )


def check_model(config: RunConfig) -> None:
    """A user's `model='package.module:build_fn'` imports, builds and can be exchanged."""
    if ":" not in config.model:
        return
    from .task import build_model_for

    try:
        build_model_for(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_output(config: RunConfig) -> None:
    """output-dir can be written; run-name holds no earlier run; resume-from can be resumed."""
    if config.resume_from:
        run_dir = Path(config.resume_from).expanduser()
        try:
            check_resumable(load_checkpoint(run_dir), config.to_flower(), run_dir)
        except CheckpointError as exc:
            raise ConfigError(f"run-config 'resume-from' = {config.resume_from!r}: {exc}") from None
        _check_writable("resume-from", config.resume_from, run_dir)
        return
    output_dir = Path(config.output_dir).expanduser()
    _check_writable("output-dir", config.output_dir, output_dir)
    name = config.run_name
    if not name:
        return
    if "/" in name or name in (".", ".."):
        raise ConfigError(
            f"run-config 'run-name' = {name!r} is not allowed; allowed: a folder name "
            "(no '/'), made inside output-dir"
        )
    run_dir = output_dir / name
    if holds_results(run_dir):
        raise ConfigError(
            f"run-config 'run-name' = {name!r}: {run_dir.resolve()} already holds a run's "
            "results; choose another run-name, leave it empty for a new timestamped one, or "
            f"continue that run with resume-from='{run_dir.resolve()}'"
        )


def check_tracking(config: RunConfig) -> None:
    """`tensorboard = true` needs the optional extra installed where the ServerApp runs."""
    wanted = config.get(TENSORBOARD_KEY, False)
    if wanted and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            f"run-config '{TENSORBOARD_KEY}' = true needs the tensorboard package; install it "
            'with pip install -e ".[tensorboard]" (or set it to false)'
        )


def _check_writable(key: str, value: str, folder: Path) -> None:
    """Create `folder` if needed and check a file can be made in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"run-config '{key}' = {value!r} cannot be created ({exc.strerror}); allowed: a "
            "folder this user can write"
        ) from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run-config '{key}' = {value!r} is not a writable folder; allowed: a folder this "
            "user can write"
        )


def node_wait_timeout(config: RunConfig) -> float:
    """`node-wait-timeout`: seconds the ServerApp waits for min-train-nodes SuperNodes."""
    value = float(config.get(NODE_WAIT_KEY, NODE_WAIT_DEFAULT))
    if not value > 0 or value == float("inf"):
        raise ConfigError(
            f"run-config '{NODE_WAIT_KEY}' = {value!r} is out of range; allowed: (0, inf)"
        )
    return value


def wait_for_nodes(
    count_nodes: Callable[[], int],
    required: int,
    timeout: float,
    *,
    poll: float = 1.0,
) -> None:
    """Return once `count_nodes()` reaches `required`; fail after `timeout` seconds.

    Flower's strategies wait for `min_available_nodes` forever; a run that cannot get its
    SuperNodes should stop and say so instead.
    """
    deadline = time.monotonic() + timeout
    while (connected := count_nodes()) < required:
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"run-config 'min-train-nodes' = {required}: only {connected} SuperNode(s) "
                f"connected within {timeout:g} s ({NODE_WAIT_KEY}); start more SuperNodes "
                "or lower min-train-nodes"
            )
        time.sleep(poll)

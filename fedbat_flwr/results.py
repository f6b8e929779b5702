"""The results contract: `<output-dir>/<run-name>/` with metrics.jsonl, summary.json, model.npz,
checkpoint.npz (and log.txt / FAILED from the local runners).

Other tools (the sweep's tables and plots, CI checks) read these files, so the keys below are
stable: add keys, never rename or drop them.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

# Keys every metrics.jsonl row has (values may be null when a round was not evaluated).
METRIC_KEYS = (
    "round",
    "method",
    "test_accuracy",
    "test_loss",
    "uplink_bytes",
    "uplink_bits_per_param",
    "downlink_bytes",
    "downlink_bits_per_param",
    "num_replies",
    "num_rejected",
    "round_seconds",
)
SUMMARY_KEYS = (
    "run_name",
    "method",
    "config",
    "num_params",
    "rounds_completed",
    "final_accuracy",
    "best_accuracy",
    "final_loss",
    "total_uplink_bytes",
    "total_downlink_bytes",
    "wall_seconds",
)


@dataclass
class RoundStats:
    """What the strategy measures about one round's uplink and downlink, for its results row."""

    started: float = field(default_factory=time.monotonic)
    downlink_bytes: int = 0
    num_sent: int = 0
    uplink_bytes: int = 0
    uplink_bits_per_param: float = 0.0
    num_replies: int = 0
    # Sampled clients whose update was not aggregated: invalid replies, failed replies (a
    # ClientApp that raised) and replies that never came (round-timeout).
    num_rejected: int = 0
    model_updated: bool = False
    # The partitions sampled this round, sorted (None: Flower sampled node ids itself).
    sampled_partitions: list[int] | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)

    def count_replies(self, num_replies: int, accepted_bytes: list[int], num_params: int) -> None:
        """The round's uplink: accepted replies, their bytes and mean bits per parameter.

        Replies that never came before the round's timeout are rejected too (num_sent is 0
        when the round was not configured here, e.g. in unit tests)."""
        self.num_replies = len(accepted_bytes)
        self.num_rejected = max(num_replies, self.num_sent) - len(accepted_bytes)
        self.uplink_bytes = sum(accepted_bytes)
        if accepted_bytes:
            self.uplink_bits_per_param = float(
                np.mean([8 * n / num_params for n in accepted_bytes])
            )


def round_row(
    server_round: int,
    method: str,
    stats: RoundStats,
    scores: Mapping[str, float],
    num_params: int,
) -> dict[str, Any]:
    """One metrics.jsonl row: the round's numbers and its evaluation (``scores``: test_accuracy,
    test_loss and any keys a method's server part adds, e.g. model_sparsity; empty when the
    round was not evaluated)."""
    sent = max(stats.num_sent, 1)
    extra = {k: v for k, v in scores.items() if k not in ("test_accuracy", "test_loss")}
    return {
        "round": server_round,
        "method": method,
        "test_accuracy": scores.get("test_accuracy"),
        "test_loss": scores.get("test_loss"),
        "uplink_bytes": stats.uplink_bytes,
        "uplink_bits_per_param": stats.uplink_bits_per_param,
        "downlink_bytes": stats.downlink_bytes,
        "downlink_bits_per_param": 8 * stats.downlink_bytes / sent / num_params,
        "num_replies": stats.num_replies,
        "num_rejected": stats.num_rejected,
        "round_seconds": time.monotonic() - stats.started,
        "model_updated": stats.model_updated,
        "train_loss": stats.train_metrics.get("train-loss"),
        "sampled_partitions": stats.sampled_partitions,
        **extra,
    }


# Files that make a folder a run's results; a new run never writes into a folder holding one.
RESULT_FILES = ("metrics.jsonl", "summary.json", "model.npz", "checkpoint.npz")
# Written by the local runners next to log.txt when a run fails: the one-line reason.
FAILED_FILE = "FAILED"
# Run-config key: also write every round's numbers as TensorBoard scalars (optional extra).
TENSORBOARD_KEY = "tensorboard"
TENSORBOARD_DIR = "tensorboard"


def default_run_name(
    method: str, dataset: str, partitioner: str, output_dir: Path | None = None
) -> str:
    """<method>-<dataset>-<partitioner>-<UTC time>; with `output_dir`, one no run there holds
    (two runs started in the same second get -2, -3, ...)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"{method}-{dataset}-{partitioner}-{stamp}"
    if output_dir is None:
        return name
    candidate, number = name, 1
    while holds_results(Path(output_dir) / candidate):
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def holds_results(run_dir: Path) -> bool:
    """True if `run_dir` has any file of a run's results (a log or FAILED note alone is not)."""
    return any((Path(run_dir) / name).exists() for name in RESULT_FILES)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write-then-rename, so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """A model checkpoint: one .npz of the exchanged state, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


CHECKPOINT = "checkpoint.npz"
CHECKPOINT_VERSION = 1
# Keys that may differ between a run and its resumption; everything else must match.
RESUMABLE_CHANGES = frozenset(
    {"num-server-rounds", "resume-from", "round-timeout", "output-dir", "run-name"}
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the run that wants to resume from it."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything a run needs to continue after its last completed round."""

    round: int
    arrays: dict[str, np.ndarray]  # the global arrays after `round`
    strategy_state: dict[str, np.ndarray]  # server-optimizer moments, server-part state
    rng: dict[str, np.ndarray]  # numpy / torch generator states (python's is in meta)
    meta: dict[str, Any]  # version, config, rows so far, python RNG, wall seconds, initial


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """One .npz holding arrays, strategy state, RNG states and a JSON blob; written atomically."""
    blob = json.dumps(_jsonable({**checkpoint.meta, "round": checkpoint.round})).encode()
    entries = {f"model/{k}": v for k, v in checkpoint.arrays.items()}
    entries.update({f"strategy/{k}": v for k, v in checkpoint.strategy_state.items()})
    entries.update({f"rng/{k}": v for k, v in checkpoint.rng.items()})
    entries["meta"] = np.frombuffer(blob, dtype=np.uint8)
    save_arrays(Path(run_dir) / CHECKPOINT, entries)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read `<run_dir>/checkpoint.npz`; any problem is a CheckpointError naming the file."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"resume-from: no checkpoint at {path} (expected a run directory written by "
            "fedbat-flwr, which checkpoints after every round)"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or partial: not an .npz archive, which fedbat-flwr "
            "writes after every round"
        )
    try:
        entries = load_arrays(path)
        meta = json.loads(entries.pop("meta").tobytes().decode())
    except Exception as exc:  # zip, npy and JSON errors all mean the same: unreadable
        # numpy's text for pickled entries advises loading them unsafely; never do that here.
        why = "it holds pickled objects" if "pickle" in str(exc) else str(exc) or repr(exc)
        raise CheckpointError(f"checkpoint {path} is corrupt or partial: {why}") from exc
    if meta.get("version") != CHECKPOINT_VERSION or not isinstance(meta.get("round"), int):
        raise CheckpointError(
            f"checkpoint {path} has version {meta.get('version')!r} / round "
            f"{meta.get('round')!r}; this fedbat-flwr reads version {CHECKPOINT_VERSION}"
        )
    groups: dict[str, dict[str, np.ndarray]] = {"model": {}, "strategy": {}, "rng": {}}
    for key, value in entries.items():
        group, _, name = key.partition("/")
        if group not in groups:
            raise CheckpointError(f"checkpoint {path} has an unknown entry {key!r}")
        groups[group][name] = value
    return Checkpoint(meta["round"], groups["model"], groups["strategy"], groups["rng"], meta)


def check_resumable(checkpoint: Checkpoint, config: Mapping[str, Any], run_dir: Path) -> None:
    """The resumed run must be the same experiment: only RESUMABLE_CHANGES may differ."""
    saved = checkpoint.meta.get("config", {})
    keys = (set(saved) | set(config)) - RESUMABLE_CHANGES
    changed = sorted(k for k in keys if saved.get(k) != config.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise CheckpointError(f"cannot resume {run_dir}: the run config differs ({diffs})")
    total = config.get("num-server-rounds")
    if isinstance(total, int) and total <= checkpoint.round:
        raise CheckpointError(
            f"cannot resume {run_dir}: it already completed {checkpoint.round} rounds and "
            f"num-server-rounds is {total}"
        )


def rng_arrays() -> dict[str, np.ndarray]:
    """numpy's and torch's global generator states, as arrays for the checkpoint."""
    import torch  # the results writer is read by tools without torch; only the server saves

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = np.array([pos, has_gauss], dtype=np.int64)
    return {
        "numpy_keys": np.asarray(keys),
        "numpy_state": numpy_state,
        "numpy_gauss": np.array([gauss]),
        "torch": torch.get_rng_state().numpy(),
    }


def restore_rng(checkpoint: Checkpoint) -> None:
    """Continue every server-side random stream where the checkpointed run left it."""
    import torch

    version, state, gauss = checkpoint.meta["python_random"]
    random.setstate((version, tuple(state), gauss))
    rng = checkpoint.rng
    pos, has_gauss = (int(v) for v in rng["numpy_state"])
    np.random.set_state(
        ("MT19937", rng["numpy_keys"], pos, has_gauss, float(rng["numpy_gauss"][0]))
    )
    torch.set_rng_state(torch.from_numpy(rng["torch"].copy()))


@dataclass
class Checkpointer:
    """The one owner of a run's checkpoint: writes it after every round's row (model, strategy
    state, RNG states, rows so far) and restores the state a resumed run continues from."""

    recorder: RunRecorder
    # The strategy's state (FedOpt moments m_t / v_t, a server part's state) and its restore.
    state: Callable[[], dict[str, np.ndarray]]
    load_state: Callable[[Mapping[str, np.ndarray]], None]

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """After the round's row: the state to continue from if the server stops now."""
        meta = {
            "version": CHECKPOINT_VERSION,
            "config": self.recorder.config,
            "rows": self.recorder.rows,
            "initial": self.recorder.initial,
            "wall_seconds": self.recorder.wall_seconds,
            "python_random": random.getstate(),
        }
        checkpoint = Checkpoint(server_round, dict(arrays), self.state(), rng_arrays(), meta)
        save_checkpoint(self.recorder.run_dir, checkpoint)

    def restore(self, checkpoint: Checkpoint) -> None:
        """The strategy's state and every server-side random stream, as the checkpoint has them."""
        self.load_state(checkpoint.strategy_state)
        restore_rng(checkpoint)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl (empty if the run has not finished a round)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class RunRecorder:
    """Writes one run's results as the rounds finish."""

    run_dir: Path
    method: str
    config: dict[str, Any]
    num_params: int
    num_rounds: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    seconds_before: float = 0.0  # wall time of the run before it was resumed
    # What produced the run (provenance.environment); `ended` is set when it finishes.
    environment: dict[str, Any] = field(default_factory=dict)
    scalars: TensorBoardScalars | None = field(default=None, init=False, repr=False)

    @classmethod
    def continuing(
        cls,
        checkpoint: Checkpoint | None,
        run_dir: Path,
        method: str,
        config: dict[str, Any],
        num_params: int,
        num_rounds: int,
    ) -> RunRecorder:
        """A recorder for a new run (``checkpoint`` None) or one resumed from ``checkpoint``:
        its rows so far, initial figures and wall time before the stop carry over."""
        meta = checkpoint.meta if checkpoint is not None else {"rows": []}
        return cls(
            run_dir,
            method,
            config,
            num_params,
            num_rounds,
            rows=list(meta["rows"]),  # a checkpoint always has them
            initial=dict(meta.get("initial", {})),
            seconds_before=float(meta.get("wall_seconds", 0.0)),
        )

    def __post_init__(self) -> None:
        """A resumed run: rewrite metrics.jsonl with the rows it already has. A new run writes
        nothing until its first round, so a run that fails before round 1 leaves no folder."""
        self.run_dir = Path(self.run_dir)
        if self.rows:
            text = "".join(json.dumps(row) + "\n" for row in self.rows)
            atomic_write_bytes(self.run_dir / "metrics.jsonl", text.encode())
        (self.run_dir / "summary.json").unlink(missing_ok=True)  # written again at the end

    @property
    def wall_seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def add_round(self, row: dict[str, Any]) -> None:
        """Append one round's row (every METRIC_KEYS key required); print a progress line."""
        missing = [k for k in METRIC_KEYS if k not in row]
        if missing:
            raise KeyError(f"metrics row lacks {missing}")
        row = _jsonable(row)
        self.rows.append(row)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.config.get(TENSORBOARD_KEY):
            self.scalars = self.scalars or TensorBoardScalars(self.run_dir / TENSORBOARD_DIR)
            self.scalars.add(row)
        # ETA: the mean round so far (training + evaluation) times the rounds left.
        seconds = [r["round_seconds"] for r in self.rows if r.get("round_seconds") is not None]
        left = self.num_rounds - int(row["round"])
        eta = sum(seconds) / len(seconds) * left if seconds else None
        print(progress_line(row, self.num_rounds, self.wall_seconds, eta), flush=True)

    def finish(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Write the final model and summary.json; return the summary."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_arrays(self.run_dir / "model.npz", arrays)
        if self.scalars is not None:
            self.scalars.close()
        if self.environment:
            self.environment["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        summary = self.summary()
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def summary(self) -> dict[str, Any]:
        accuracies = [r["test_accuracy"] for r in self.rows if r["test_accuracy"] is not None]
        evaluated = [r for r in self.rows if r["test_accuracy"] is not None]
        return {
            "run_name": self.run_dir.name,
            "method": self.method,
            "config": self.config,
            "num_params": self.num_params,
            "rounds_completed": len(self.rows),
            "initial_accuracy": self.initial.get("accuracy"),
            "final_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
            "best_accuracy": max(accuracies) if accuracies else None,
            "final_loss": evaluated[-1]["test_loss"] if evaluated else None,
            "total_uplink_bytes": sum(r["uplink_bytes"] for r in self.rows),
            "total_downlink_bytes": sum(r["downlink_bytes"] for r in self.rows),
            "mean_uplink_bits_per_param": _mean(r["uplink_bits_per_param"] for r in self.rows),
            "total_rejected": sum(r["num_rejected"] for r in self.rows),
            "wall_seconds": self.wall_seconds,
            "environment": self.environment or None,
        }


class TensorBoardScalars:
    """Every number of a metrics.jsonl row as a TensorBoard scalar at step = round, for people
    who already track runs there (`pip install -e ".[tensorboard]"`; metrics.jsonl stays the
    contract)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # only when a run asks for it

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def progress_line(
    row: Mapping[str, Any],
    num_rounds: int,
    elapsed: float | None = None,
    eta: float | None = None,
) -> str:
    """The console line of one round: its row's numbers, then the run's wall time so far
    (`elapsed`) and the estimated time to its last round (`eta`), when given."""
    acc = row["test_accuracy"]
    acc_text = "   n/a" if acc is None else f"{acc:.4f}"
    line = (
        f"[fedbat-flwr] round {row['round']:>3}/{num_rounds} | {row['method']} | "
        f"test acc {acc_text} | uplink {row['uplink_bits_per_param']:.3f} bit/param | "
        f"replies {row['num_replies']} (+{row['num_rejected']} rejected) | "
        f"{row['round_seconds']:.1f} s"
    )
    if elapsed is not None:
        line += f" | elapsed {clock(elapsed)}"
    if eta is not None:
        line += f" | ETA {clock(eta)}"
    return line


def final_line(summary: Mapping[str, Any], run_dir: Path) -> str:
    """One line for the end of a run: rounds and wall time, final and best accuracy, total
    bytes up and down, and the run folder (from summary.json's keys)."""

    def accuracy(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    return (
        f"{summary['rounds_completed']} rounds in {clock(summary['wall_seconds'])}: "
        f"final accuracy {accuracy('final_accuracy')}, best {accuracy('best_accuracy')}, "
        f"uplink {summary['total_uplink_bytes'] / 1e6:.2f} MB, "
        f"downlink {summary['total_downlink_bytes'] / 1e6:.2f} MB; results in {run_dir}"
    )


def clock(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _mean(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _jsonable(obj: Any) -> Any:
    """numpy scalars -> Python; NaN/inf -> None (JSON has neither)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

"""What produced a run: code, libraries, threads and machine (summary.json's `environment`).

Runs are only comparable when these match; `fedbat-report` and the sweep's tables warn when they
do not. Reading them must never fail a run: anything unknowable is recorded as None.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# Set by the project's launchers (fedbat_tools.localrun): the checkout a run's code came from.
SOURCE_ENV = "FEDBAT_FLWR_SOURCE"
# What the app's code is, in its checkout: a change elsewhere (results, docs) is not "dirty".
APP_PATHS = (":/fedbat_flwr", ":/pyproject.toml")
LIBRARIES = ("flwr", "torch", "numpy")
# Keys whose difference makes two runs' numbers incomparable (reports warn on them).
COMPARED_KEYS = (
    "commit",
    "dirty",
    "code_sha256",
    "python",
    *LIBRARIES,
    "torch_threads",
    "client_torch_threads",
)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment(client_threads: Iterable[int] = ()) -> dict[str, Any]:
    """The provenance of a run started now, in this process (the ServerApp)."""
    commit, dirty = git_state(_source_candidates())
    return {
        "commit": commit,
        "dirty": dirty,
        "code_sha256": code_sha256(),
        "python": platform.python_version(),
        **{name: _version(name) for name in LIBRARIES},
        "torch_threads": _torch_threads(),
        "client_torch_threads": sorted(set(client_threads)) or None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu": _gpu(),
        "hostname": platform.node(),
        "started": now_utc(),
        "ended": None,
    }


def git_state(candidates: Iterable[Path]) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the app's files differ from it, untracked ones included) of the
    first candidate folder in a git checkout; (None, None) when none is."""
    for folder in candidates:
        head = _git(folder, "rev-parse", "HEAD")
        if head is None:
            continue
        status = _git(folder, "status", "--porcelain", "--", *APP_PATHS)
        return head, None if status is None else bool(status)
    return None, None


def code_sha256(package_dir: Path = PACKAGE_DIR) -> str:
    """A hash of the running package's Python sources: what ran, whatever git says."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def differences(environments: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """One line per COMPARED_KEYS key on which the named runs differ (or that a run lacks)."""
    lines = []
    missing = sorted(name for name, env in environments.items() if not env)
    if missing:
        lines.append(f"no recorded environment: {', '.join(missing)}")
    known = {name: env for name, env in environments.items() if env}
    for key in COMPARED_KEYS:
        values = {name: env.get(key) for name, env in known.items()}
        if len({repr(v) for v in values.values()}) > 1:
            seen = ", ".join(f"{name}={_short(v)}" for name, v in sorted(values.items()))
            lines.append(f"{key} differs: {seen}")
    return lines


def _short(value: Any) -> str:
    return value[:10] if isinstance(value, str) and len(value) == 40 else repr(value)


def _source_candidates() -> list[Path]:
    """Where the run's checkout may be: the launcher's, the working folder, the package's."""
    named = os.environ.get(SOURCE_ENV)
    return [Path(p) for p in (named, os.getcwd(), PACKAGE_DIR) if p]


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

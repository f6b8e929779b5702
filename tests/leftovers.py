"""What a command leaves behind: temporary files and processes (tests of issue 33, item 3).

Other programs on the machine write to /tmp at the same time, so a command under test gets a
temporary folder of its own (TMPDIR, which Python's tempfile, Flower and Ray honour) and a
marker in its environment, which every process it starts inherits. Afterwards the folder must
be empty and no living process may carry the marker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedbat_tools.localrun import processes_with_env

MARKER = "FEDBAT_TEST_LEFTOVER_MARK"


def processes_marked(mark: str) -> list[int]:
    """Living processes (not zombies), other than this one, with MARKER=<mark> in their
    environment (Linux /proc)."""
    return processes_with_env(MARKER, mark)


def zombie_children() -> list[int]:
    """This process' children that exited and were never waited for."""
    zombies = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(int(entry.name))
    return zombies


@contextmanager
def nothing_left_behind() -> Iterator[Path]:
    """Inside the block, commands started from this process get a fresh TMPDIR (yielded) and
    the marker; afterwards the TMPDIR must be empty, and no process of theirs may run or be a
    zombie of ours. The TMPDIR is short, so that Ray's socket paths fit below it."""
    tmp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    mark = uuid.uuid4().hex
    saved = {key: os.environ.get(key) for key in ("TMPDIR", MARKER)}
    os.environ.update(TMPDIR=str(tmp), **{MARKER: mark})
    try:
        yield tmp
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        left = sorted(p.name for p in tmp.iterdir())
        shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"left in TMPDIR: {left}"
    assert not processes_marked(mark), "a process the command started still runs"
    assert not zombie_children(), "a child of this process was never waited for"

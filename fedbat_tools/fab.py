"""What `flwr run` would pack into the app bundle (FAB), by Flower's own build rules.

Flower walks the whole app folder (`.venv` and results included) and then filters it through
.gitignore and pyproject's `fab-include` / `fab-exclude`. Here git-ignored folders are skipped
while walking, which gives the same files in a fraction of a second, and the bundle itself is
built by `flwr.cli.build.build_fab_from_files`, so the answer follows Flower's rules as they are.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import build_pathspec, load_gitignore_patterns

from .localrun import APP_DIR

CONTENT_FILE = ".info/CONTENT"  # Flower's manifest inside every FAB


def app_files(app_dir: Path = APP_DIR) -> dict[str, Path]:
    """Every file of the app folder outside git-ignored folders, by relative POSIX path."""
    app_dir = app_dir.resolve()
    ignored = build_pathspec(load_gitignore_patterns(app_dir / ".gitignore"))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(app_dir):
        relative = Path(dirpath).relative_to(app_dir)
        dirnames[:] = [
            d for d in dirnames if not ignored.match_file(f"{(relative / d).as_posix()}/")
        ]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():  # Flower skips symlinks too
                files[(relative / name).as_posix()] = path
    return files


def fab_contents(
    app_dir: Path = APP_DIR, extra: Mapping[str, bytes] | None = None
) -> dict[str, int]:
    """The FAB's files and their sizes in bytes (manifest excluded); `extra` adds files that
    are not on disk, e.g. a probe of where results would land. Raises Flower's ValueError
    when it refuses to build (a fab-exclude pattern that matches nothing, a FAB over 10 MB)."""
    fab, _ = build_fab_from_files({**app_files(app_dir), **(extra or {})})
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {i.filename: i.file_size for i in archive.infolist() if i.filename != CONTENT_FILE}

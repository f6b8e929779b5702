"""The app bundle (FAB) `flwr run` ships to every run: what a run imports, and nothing else.

Built by Flower's own rules (`flwr.cli.build`) from this folder, with pyproject's `fab-exclude`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedbat_tools.fab import app_files, fab_contents
from fedbat_tools.localrun import APP_DIR

# What a run may need besides the app package: the user-model example (model='examples.mlp:...').
RUN_TIME_FOLDERS = {"fedbat_flwr", "examples"}
TOP_LEVEL_FILES = {"pyproject.toml", "README.md"}


@pytest.fixture(scope="module")
def fab() -> dict[str, int]:
    return fab_contents(APP_DIR)


def test_no_tool_module_in_the_fab(fab: dict[str, int]) -> None:
    assert not [name for name in fab if name.startswith("fedbat_tools/")]
    assert (APP_DIR / "fedbat_tools" / "sweep.py").is_file(), "the tools are still in the folder"


def test_the_quickstart_app_is_not_in_the_fab(fab: dict[str, int]) -> None:
    """examples/quickstart is an app of its own (`flwr run examples/quickstart` bundles it)."""
    assert not [name for name in fab if name.startswith("examples/quickstart/")]
    assert (APP_DIR / "examples" / "quickstart" / "pyproject.toml").is_file()


def test_the_fab_holds_the_app_and_only_what_a_run_imports(fab: dict[str, int]) -> None:
    folders = {name.split("/")[0] for name in fab if "/" in name}
    assert folders == RUN_TIME_FOLDERS
    assert {name for name in fab if "/" not in name} == TOP_LEVEL_FILES
    assert "fedbat_flwr/server_app.py" in fab and "fedbat_flwr/client_app.py" in fab
    assert "examples/mlp.py" in fab


def test_the_fab_holds_every_module_of_the_app_package(fab: dict[str, int]) -> None:
    package = {n for n in app_files(APP_DIR) if n.startswith("fedbat_flwr/") and n.endswith(".py")}
    assert package <= set(fab)


def test_the_app_package_never_imports_the_tools() -> None:
    """The ServerApp and ClientApp run from the FAB, where fedbat_tools does not exist."""
    offenders = []
    for path in sorted((APP_DIR / "fedbat_flwr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n.split(".")[0] == "fedbat_tools" for n in names):
                offenders.append(f"{path.relative_to(APP_DIR)}:{node.lineno}")
    assert not offenders


def test_app_files_match_what_flower_collects(tmp_path: Path) -> None:
    """Skipping git-ignored folders while walking gives Flower's own file list."""
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    (tmp_path / "pyproject.toml").write_text((APP_DIR / "pyproject.toml").read_text())
    (tmp_path / ".gitignore").write_text(".venv\nresults/\n")
    for name in ("a/b.py", ".venv/lib/x.py", "results/r/summary.json", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    flower = set(filter_paths_for_publish(collect_files(tmp_path)))
    assert set(filter_paths_for_publish(app_files(tmp_path))) == flower
    assert "a/b.py" in flower and not any(n.startswith((".venv", "results")) for n in flower)

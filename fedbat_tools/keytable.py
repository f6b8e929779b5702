"""The README's table of run-config keys, generated from pyproject.toml.

Every key of `[tool.flwr.app.config]` is declared there once, with its default and a one-line
help in the comment after it; the README shows them as one table between two markers:

    python -m fedbat_tools.keytable           # rewrite the table in README.md
    python -m fedbat_tools.keytable --check   # exit 1 if README.md's table is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .localrun import APP_DIR

TABLE_HEADER = "[tool.flwr.app.config]"
BEGIN = "<!-- run-config keys: generated from pyproject.toml by python -m fedbat_tools.keytable -->"
END = "<!-- end of run-config keys -->"
# `key = value  # help`; a value is a TOML string or one bare token (number, boolean).
KEY_LINE_RE = re.compile(
    r'^(?P<key>[A-Za-z0-9_-]+)\s*=\s*(?P<value>"[^"]*"|\S+)\s*(?:#\s*(?P<help>.*))?$'
)


class KeyTableError(ValueError):
    """pyproject.toml or README.md lacks what the table needs; the message says what."""


@dataclass(frozen=True)
class KeyHelp:
    """One run-config key as pyproject.toml declares it."""

    key: str
    default: str  # the TOML text of the default, as written
    help: str


def declared_keys(pyproject: Path = APP_DIR / "pyproject.toml") -> list[KeyHelp]:
    """The keys of `[tool.flwr.app.config]` in file order; a key without help is an error."""
    keys: list[KeyHelp] = []
    inside = False
    for line in pyproject.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            inside = stripped == TABLE_HEADER
            continue
        match = KEY_LINE_RE.match(stripped) if inside else None
        if match is None:
            continue
        if not match["help"]:
            raise KeyTableError(f"pyproject.toml: run-config key {match['key']!r} has no help")
        keys.append(KeyHelp(match["key"], match["value"], match["help"].strip()))
    return keys


def markdown_table(keys: Sequence[KeyHelp]) -> str:
    """| key | default | meaning |, one row a key."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for item in keys:
        default = item.default.strip('"') if item.default != '""' else '""'
        meaning = item.help.replace("|", "\\|")
        rows.append(f"| `{item.key}` | `{default}` | {meaning} |")
    return "\n".join(rows)


def with_table(readme: str, table: str) -> str:
    """`readme` with the text between BEGIN and END replaced by `table`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise KeyTableError(f"README.md has no {BEGIN!r} ... {END!r} block")
    return f"{readme[: start + len(BEGIN)]}\n{table}\n{readme[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedbat_tools.keytable", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check README.md's table")
    args = parser.parse_args(argv)
    readme_path = APP_DIR / "README.md"
    readme = readme_path.read_text()
    updated = with_table(readme, markdown_table(declared_keys()))
    if args.check:
        if updated != readme:
            print(
                "README.md's run-config table is out of date; run python -m fedbat_tools.keytable"
            )
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make test-lowest`: the lowest version of each runtime dependency that pyproject allows.

Prints one ``name==floor`` per line, read from ``[project] dependencies`` (the one place
the bounds are stated), for ``pip install`` beside the project itself: pip then also
refuses floors that cannot be installed together.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# "name>=floor,<ceiling", the form every runtime dependency must take (a test checks it).
DEPENDENCY = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)>=(?P<floor>[0-9][0-9.]*),<(?P<ceiling>[0-9][0-9.]*)"
)


def runtime_dependencies(pyproject: Path = PYPROJECT) -> list[str]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    dependencies: list[str] = data["project"]["dependencies"]
    return dependencies


def bounds(dependency: str) -> tuple[str, str, str]:
    """``"typer>=0.17.5,<1"`` → ``("typer", "0.17.5", "1")``; ValueError for any other form."""
    match = DEPENDENCY.fullmatch(dependency.replace(" ", ""))
    if match is None:
        raise ValueError(f"{dependency!r} is not of the form name>=floor,<ceiling")
    return match["name"], match["floor"], match["ceiling"]


def lowest_pins(pyproject: Path = PYPROJECT) -> list[str]:
    pins = []
    for dependency in runtime_dependencies(pyproject):
        name, floor, _ = bounds(dependency)
        pins.append(f"{name}=={floor}")
    return pins


if __name__ == "__main__":
    try:
        print("\n".join(lowest_pins()))
    except ValueError as exc:
        sys.exit(f"pyproject.toml: {exc}")

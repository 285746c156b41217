"""The dependency bounds in pyproject.toml: each a floor that `make test-lowest` installs
(CI runs it before `make test`) and a ceiling at the next major release."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.lowest_versions import bounds, lowest_pins, runtime_dependencies

ROOT = Path(__file__).resolve().parents[1]


def _release(text: str) -> tuple[int, ...]:
    """``"2.14.4"`` → ``(2, 14, 4)`` (the leading release numbers only)."""
    match = re.match(r"\d+(\.\d+)*", text)
    assert match, text
    return tuple(int(part) for part in match.group().split("."))


@pytest.mark.parametrize("dependency", runtime_dependencies())
def test_every_runtime_dependency_has_a_floor_and_a_next_major_ceiling(dependency: str) -> None:
    name, floor, ceiling = bounds(dependency)

    assert re.fullmatch(r"\d+", ceiling), f"{name}: the ceiling is a whole major, got {ceiling}"
    assert _release(floor) < _release(ceiling)
    # The versions the whole suite runs on lie inside the bounds, so the ceiling is not
    # below what is tested and the floor is a real lower end.
    installed = _release(version(name))
    assert _release(floor) <= installed < _release(ceiling), f"{name} {version(name)}"


def test_a_dependency_without_both_bounds_is_refused() -> None:
    for loose in ("typer>=0.17", "typer<1", "typer", "typer~=0.17"):
        with pytest.raises(ValueError, match="name>=floor,<ceiling"):
            bounds(loose)


def test_the_lowest_pins_are_the_floors(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["rich>=13,<16", "pydantic-settings >= 2.3, < 3"]\n'
    )

    assert lowest_pins(pyproject) == ["rich==13", "pydantic-settings==2.3"]


def test_ci_runs_the_lowest_versions_before_the_suite() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    steps = re.findall(r"^make [a-z-]+$", ci, flags=re.MULTILINE)
    assert steps == ["make test-lowest", "make test"]
    assert "make test-lowest" in (ROOT / "README.md").read_text().replace("\n", " ")

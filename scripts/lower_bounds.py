"""Print `name==lower` for every dependency in pyproject.toml that has a lower bound (with the given extras): the
constraints `scripts/refresh_lock.sh --oldest` installs to test the far end of the supported ranges."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

# "name[extra]>=1.2,<2 ; marker": name, then comma-separated specifiers (enough for pyproject.toml's own lines;
# a fresh venv has no `packaging` to parse them with).
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def lower_bounds(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(project['optional-dependencies'])}")
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for text in requirements:
        name, specifiers = REQUIREMENT.match(text).groups()
        lows = [spec.strip()[2:].strip() for spec in specifiers.split(",") if spec.strip()[:2] in (">=", "==")]
        if lows:
            pins[name.lower()] = max(lows, key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit()))
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. sim,dev")
    parser.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    args = parser.parse_args()
    extras = [e for e in args.extras.split(",") if e]
    print("\n".join(lower_bounds(Path(args.pyproject), extras)))


if __name__ == "__main__":
    main()

"""Reading run settings from YAML files and the command line.

YAML 1.1 (PyYAML) reads `3e-4` as a string (its floats need a dot: `3.0e-4`); people write `3e-4`. Values are
therefore parsed as int, then float, then YAML, and each setting is checked against its field's default type.
"""

from __future__ import annotations

import dataclasses

import yaml


def parse_value(text: str):
    """A command-line value: 3 -> int, 3e-4 -> float, true -> bool, [0.9, 0.99] -> list, else a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return yaml.safe_load(text)


def coerce_settings(settings: dict, config_class) -> dict:
    """Numbers given as strings (from YAML files) become numbers where the field's default is a number; a value that
    cannot be one is an error naming the setting."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    result = dict(settings)
    for name, value in settings.items():
        default = defaults.get(name, dataclasses.MISSING)
        if isinstance(default, bool) or default is dataclasses.MISSING or default is None:
            continue
        if isinstance(default, (int, float)) and isinstance(value, str):
            parsed = parse_value(value)
            if not isinstance(parsed, (int, float)) or isinstance(parsed, bool):
                raise ValueError(f"setting {name!r} must be a number, got {value!r}")
            result[name] = float(parsed) if isinstance(default, float) else parsed
    return result

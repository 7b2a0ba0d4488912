"""Reading run settings from YAML files and the command line.

YAML 1.1 (PyYAML) reads `3e-4` as a string (its floats need a dot: `3.0e-4`); people write `3e-4`. Values are
therefore parsed as int, then float, then YAML, and each setting is checked against its field's default type.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path

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
    list_fields = {f.name for f in dataclasses.fields(config_class)
                   if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), list)}
    result = dict(settings)
    for name, value in settings.items():
        if name in list_fields and value is not None and not isinstance(value, (list, tuple)):
            # `--gripper-dims 3` or `gripper_dims: 0,3` mean [3] and [0, 3]; a mapping is not a list
            if isinstance(value, dict):
                raise ValueError(f"setting {name!r} must be a list, e.g. [0, 3]; got {value!r}")
            pieces = value.split(",") if isinstance(value, str) else [value]
            result[name] = [parse_value(p.strip()) if isinstance(p, str) else p for p in pieces if str(p).strip()]
            continue
        default = defaults.get(name, dataclasses.MISSING)
        if isinstance(default, bool) or default is dataclasses.MISSING or default is None:
            continue
        if isinstance(default, (int, float)) and isinstance(value, str):
            parsed = parse_value(value)
            if not isinstance(parsed, (int, float)) or isinstance(parsed, bool):
                raise ValueError(f"setting {name!r} must be a number, got {value!r}")
            result[name] = float(parsed) if isinstance(default, float) else parsed
    return result


def unknown_key_error(keys, field_names: list[str], where: str) -> ValueError:
    """The error for settings no field has, with the closest valid name suggested for each."""
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, field_names, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"Unknown setting(s) in {where}: {', '.join(hints)}. Valid settings: {', '.join(field_names)}.")


def preset_and_file_settings(config_file: str | None, cli_preset: str | None, presets: dict | None,
                             field_names: list[str], nested=(), default: str = "tiny") -> tuple[str | None, dict]:
    """(preset name, preset settings updated by the YAML file's). The file may name a `preset`; unknown keys are
    errors; each of the file's `nested` mappings (e.g. `model`) adds to the preset's instead of replacing it.
    Without `presets` (a stage that has none) the preset is None and the file's settings are all there is."""
    nested = (nested,) if isinstance(nested, str) else tuple(nested)
    file_settings: dict = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_file}: no such file")
        file_settings = yaml.safe_load(path.read_text()) or {}
        if not isinstance(file_settings, dict):
            raise ValueError(f"{config_file} must hold a mapping of settings")
    file_preset = file_settings.pop("preset", None)
    unknown = sorted(set(file_settings) - set(field_names))
    if unknown:
        raise unknown_key_error(unknown, field_names, config_file)
    if not presets:
        if cli_preset or file_preset:
            raise ValueError(f"this stage has no presets, got {cli_preset or file_preset!r}")
        return None, file_settings
    preset = cli_preset or file_preset or default
    if preset not in presets:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(presets)}")
    settings = {**presets[preset], **file_settings}
    for name in nested:
        settings[name] = {**(presets[preset].get(name) or {}), **(file_settings.get(name) or {})}
    return preset, settings


def add_key_values(base: dict | None, items: list[str], flag: str) -> dict:
    """`base` updated by command-line `KEY=VALUE` items (values parsed like any setting)."""
    result = dict(base or {})
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        result[key] = parse_value(text)
    return result


def trackers(report_to: str):
    """Accelerate's `log_with`: "auto" = TensorBoard when it is installed, "none" = no tracker."""
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401  (only: is it installed?)
        except ImportError:
            return None
        return "tensorboard"
    return report_to


def _optional_string(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "null", "~") else text


def value_parser(f: dataclasses.Field):
    """How a flag's text becomes the field's value: text fields keep their text (`--revision 007` stays "007";
    `none` is None where the field may be None), every other field is parsed like a YAML setting (`parse_value`)."""
    kind = str(f.type).replace(" ", "")
    if kind == "str":
        return str
    if kind in ("str|None", "None|str", "Optional[str]"):
        return _optional_string
    return parse_value


def is_boolean_field(f: dataclasses.Field) -> bool:
    """A field set on or off: a bool default, or `bool | None` (None = not decided, e.g. "resume if possible")."""
    return isinstance(f.default, bool) or str(f.type).replace(" ", "") in ("bool|None", "None|bool", "Optional[bool]")


def add_config_arguments(parser: argparse.ArgumentParser, config_class, repeatable: dict[str, str] | None = None,
                         key_values: dict[str, str] | None = None, exclude=("preset", "stage"),
                         exclusive=()) -> None:
    """One flag per field of the dataclass `config_class`, by one rule for every script:

    - a boolean field `x_y` (`is_boolean_field`) is `--x-y` / `--no-x-y`;
    - a field named in `repeatable` (a list) takes one value per use (`--dataset A --dataset B`);
    - a field named in `key_values` (a dict) takes `KEY=VALUE` items (`--model hidden_size=256`, repeatable);
    - any other field takes one value, parsed like a YAML setting (`3e-4`, `[0.9, 0.99]`, `none`).

    A field's help is its `metadata["help"]` when it has one. The flags of the fields in each group of `exclusive`
    (e.g. `[("resume", "overwrite")]`) cannot be given together.

    Every flag defaults to None (= not given), so that the preset and the YAML file decide what is not on the
    command line (see `settings_from_args`)."""
    repeatable, key_values = repeatable or {}, key_values or {}
    target_of = {}  # field -> the mutually exclusive group its flag goes in
    for names in exclusive:
        group = parser.add_mutually_exclusive_group()
        target_of.update({name: group for name in names})
    for f in dataclasses.fields(config_class):
        if f.name in exclude:
            continue  # declared fields set by the stage itself (`stage`) or by `--preset` (see `stage_parser`)
        flag = "--" + f.name.replace("_", "-")
        target = target_of.get(f.name, parser)
        given_help = f.metadata.get("help")
        if f.name in key_values:
            target.add_argument(flag, action="append", default=None, metavar="KEY=VALUE", help=key_values[f.name])
        elif f.name in repeatable:
            target.add_argument(flag, action="append", default=None, help=repeatable[f.name])
        elif is_boolean_field(f):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=given_help or f"(default from the preset; else {f.default})")
        else:
            target.add_argument(flag, default=None, type=value_parser(f), metavar=f.name.upper(),
                                help=given_help or "(default from the preset)")


def settings_from_args(args: argparse.Namespace, settings: dict, config_class, key_values=()) -> dict:
    """`settings` (preset + file) updated by the flags given on the command line (`add_config_arguments`)."""
    result = dict(settings)
    for f in dataclasses.fields(config_class):
        if f.name in ("preset", "stage"):
            continue
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in key_values:
            value = add_key_values(result.get(f.name), value, "--" + f.name.replace("_", "-"))
        result[f.name] = value
    return result


def stage_parser(config_class, *, prog: str, description: str | None = None, presets: dict | None = None,
                 repeatable: dict[str, str] | None = None, key_values: dict[str, str] | None = None,
                 exclusive=(), epilog: str | None = None, extra=None) -> argparse.ArgumentParser:
    """The command line of a stage, built from its config dataclass: `--preset` (when it has presets), `--config
    FILE` (YAML), and one flag per field by the rule of `add_config_arguments` (`exclusive`: groups of fields whose
    flags exclude each other). `extra(parser)` adds options that are not settings (none of ours so far)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="settings preset (default: tiny, or the YAML file's `preset`)")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML file of settings")
    add_config_arguments(parser, config_class, repeatable, key_values, exclusive=exclusive)
    if extra is not None:
        extra(parser)
    return parser


def resolve_stage_config(config_class, parser: argparse.ArgumentParser, argv: list[str] | None, *,
                         presets: dict | None = None, key_values=(), fixed: dict | None = None, validate=None):
    """defaults <- preset <- YAML file <- command line, into a `config_class` instance: the one way every stage
    reads its settings. Unknown keys are refused with a suggestion, numbers from YAML are numbers, `fixed` settings
    (e.g. the stage's name) are not the user's to change, and `validate(config)` raises on bad values."""
    args = parser.parse_args(argv)
    field_names = [f.name for f in dataclasses.fields(config_class)]
    preset, settings = preset_and_file_settings(getattr(args, "config", None), getattr(args, "preset", None), presets,
                                                field_names, nested=key_values)
    settings = settings_from_args(args, settings, config_class, key_values=key_values)
    if preset is not None:
        settings["preset"] = preset
    settings.update(fixed or {})
    config = config_class(**coerce_settings(settings, config_class))
    if validate is not None:
        validate(config)
    return config


def preset_config(config_class, presets: dict, preset: str, *, nested=(), validate=None, **settings):
    """A config object from a preset and settings given in code (what `resolve_stage_config` does for a command
    line): the quickstart and the benchmarks compose stages this way. Mappings named in `nested` add to the
    preset's; unknown settings are refused like unknown keys in a YAML file."""
    if preset not in presets:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(presets)}")
    field_names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(settings) - set(field_names))
    if unknown:
        raise unknown_key_error(unknown, field_names, "the given settings")
    merged = {**presets[preset], **settings, "preset": preset}
    for name in (nested,) if isinstance(nested, str) else nested:
        merged[name] = {**(presets[preset].get(name) or {}), **(settings.get(name) or {})}
    config = config_class(**coerce_settings(merged, config_class))
    if validate is not None:
        validate(config)
    return config

"""Every command line the docs show parses with the script it names, so docs and parsers cannot drift apart.

The commands come from README.md (code blocks and inline code) and from the usage lines in each script's module
docstring. Each is parsed by the script's own `build_parser()` (every script has one) and, for the training stages,
resolved into its settings (preset, `KEY=VALUE` items, types); nothing is run. One boolean rule holds everywhere:
every on/off flag is `--x` / `--no-x`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from support import REPO_ROOT

README = REPO_ROOT / "README.md"
SCRIPT_MODULES = [
    "training.train_quantizer", "training.label_latents", "training.pretrain", "training.finetune",
    "training.merge_lora", "training.quickstart", "training.imagine", "training.evaluate", "training.envs.metaworld_data",
    "modeling_lapa.convert_laq_checkpoint", "modeling_lapa.convert_lapa_jax", "modeling_lapa.convert_lwm_vqgan",
    "hub_cards.publish", "benchmarks.convert_lapa_jax_memory", "benchmarks.data_speed", "benchmarks.label_speed",
    "benchmarks.quantizer_speed", "benchmarks.vla_speed", "benchmarks.paper_experiment",
]
# Stages whose settings are resolved too (argv -> config object, with the preset and the KEY=VALUE items).
RESOLVERS = {
    "training.train_quantizer": lambda m, argv: importlib.import_module("training.train_quantizer").resolve_config(argv),
    "training.label_latents": lambda m, argv: m.resolve_config(argv),
    "training.pretrain": lambda m, argv: importlib.import_module("training.vla_training").resolve_config("pretrain", argv),
    "training.finetune": lambda m, argv: importlib.import_module("training.vla_training").resolve_config("finetune", argv),
}


def _commands_in(text: str) -> list[str]:
    """Shell commands in fenced code blocks and in inline code, continuation lines joined, `&&` chains split."""
    text = re.sub(r"\\\n\s*", " ", text)  # continuation lines
    lines: list[str] = []
    fence = None  # the language of the fenced block we are in
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:] or "text")
        elif fence in ("bash", "sh", "shell", "text") or (
                fence is None and re.match(r"^\s{4,}(python -m |python \S+\.py|accelerate launch )", line)):
            lines.append(line)  # shell blocks, and indented usage lines in docstrings
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    inline = [" ".join(c.split()) for c in re.findall(r"`((?:python|accelerate launch|bash) [^`]+)`", outside)]
    commands = []
    for line in lines + inline:
        line = line.split("#", 1)[0].strip()
        for part in line.split("&&"):
            part = part.strip()
            if re.match(r"^(python|accelerate launch|bash scripts/)", part):
                commands.append(part)
    return commands


def _module_and_argv(command: str) -> tuple[str | None, list[str]]:
    """('training.pretrain', [args...]) for `accelerate launch [opts] training/pretrain.py args` and `python -m`
    / `python path.py` forms; (None, ...) for commands that are not one of our scripts (pytest, setup.sh)."""
    tokens = [t for t in shlex.split(command) if t != "..."]
    if tokens[:2] == ["accelerate", "launch"]:
        rest = tokens[2:]
        while rest and not rest[0].endswith(".py"):
            rest = rest[1:]  # accelerate's own options (--multi_gpu --num_processes 8 ...)
        tokens = ["python"] + rest
    if tokens[0] != "python" or len(tokens) < 2:
        return None, tokens
    if tokens[1] == "-m":
        return (None if tokens[2] == "pytest" else tokens[2]), tokens[3:]
    path = tokens[1]
    return path.removesuffix(".py").replace("/", "."), tokens[2:]


def _documented_commands() -> list[tuple[str, str]]:
    found = [("README.md", c) for c in _commands_in(README.read_text())]
    for name in SCRIPT_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        found += [(name, c) for c in _commands_in(doc)]
    return found


DOCUMENTED = _documented_commands()


def test_the_docs_show_commands_of_every_stage():
    modules = {_module_and_argv(c)[0] for _, c in DOCUMENTED}
    for stage in ("training.quickstart", "training.train_quantizer", "training.label_latents", "training.pretrain",
                  "training.finetune", "training.merge_lora", "modeling_lapa.convert_lapa_jax"):
        assert stage in modules, f"no documented command for {stage}"


@pytest.mark.parametrize("where,command", DOCUMENTED, ids=[f"{w}:{c[:60]}" for w, c in DOCUMENTED])
def test_documented_command_parses(where, command):
    module_name, argv = _module_and_argv(command)
    if command.startswith("bash scripts/"):
        script = REPO_ROOT / shlex.split(command)[1]
        assert script.exists(), f"{where}: {command!r} names a missing script"
        if script.name == "setup.sh" and len(shlex.split(command)) > 2:  # its argument is a list of extras
            extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
            for extra in shlex.split(command)[2].split(","):
                assert extra in extras, f"{where}: {command!r} asks for an unknown extra {extra!r}"
        return
    if module_name is None:
        return  # pytest
    assert module_name in SCRIPT_MODULES, f"{where}: {command!r} runs {module_name}, which this test does not know"
    module = importlib.import_module(module_name)
    parser = module.build_parser()
    if not argv or "..." in shlex.split(command):
        # A reference to the script (`python -m training.merge_lora`) or an elided one (`train.py ... --lora`):
        # every flag it does show must be one of the script's.
        known = {option for action in parser._actions for option in action.option_strings}
        shown = [t.split("=", 1)[0] for t in argv if t.startswith("--")]
        assert set(shown) <= known, f"{where}: {command!r} shows unknown flags {sorted(set(shown) - known)}"
        return
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: {command!r} does not parse (exit {exit_.code})")
    config_file = argv[argv.index("--config") + 1] if "--config" in argv else None
    if module_name in RESOLVERS and (config_file is None or Path(config_file).exists()):
        RESOLVERS[module_name](module, argv)  # raises on an unknown KEY=VALUE, a bad type or value


@pytest.mark.parametrize("module_name", SCRIPT_MODULES)
def test_every_script_has_help_and_one_boolean_rule(module_name, capsys):
    parser = importlib.import_module(module_name).build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
    for action in parser._actions:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            pytest.fail(f"{module_name}: {action.option_strings} is a one-way switch; use "
                        "argparse.BooleanOptionalAction (--x / --no-x)")


@pytest.mark.parametrize("module_name", ["training.train_quantizer", "training.pretrain", "training.finetune"])
def test_streaming_is_a_bare_flag_with_its_negation(module_name):
    parser = importlib.import_module(module_name).build_parser()
    assert parser.parse_args(["--dataset", "d", "--streaming"]).streaming is True
    assert parser.parse_args(["--dataset", "d", "--no-streaming"]).streaming is False
    assert parser.parse_args(["--dataset", "d"]).streaming is None  # not given: the preset decides
    resolve = RESOLVERS[module_name]
    assert resolve(None, ["--dataset", "d", "--streaming"]).streaming is True


@pytest.mark.parametrize("given, expected", [("3", [3]), ("[3]", [3]), ("0,3", [0, 3]), ("[0, 3]", [0, 3])])
def test_a_list_setting_takes_one_value_or_a_list(given, expected):
    """`--gripper-dims 3` once reached the action tokenizer as the int 3 and failed there with a TypeError."""
    config = RESOLVERS["training.finetune"](None, ["--dataset", "d", "--gripper-dims", given])
    assert config.gripper_dims == expected


def test_a_list_setting_refuses_a_mapping():
    with pytest.raises(ValueError, match="gripper_dims.*must be a list"):
        RESOLVERS["training.finetune"](None, ["--dataset", "d", "--gripper-dims", "{a: 1}"])

"""The shape of `training/`: small modules and functions, scripts on top of libraries (never the reverse), and no
sys.path edits (the project is installed; `accelerate launch training/<stage>.py` finds it that way)."""

import ast
from pathlib import Path

import pytest

from support import REPO_ROOT

TRAINING = REPO_ROOT / "training"
# Stage scripts: they may import libraries and each other (the quickstart composes them); libraries import none.
SCRIPT_MODULES = {"train_quantizer", "label_latents", "pretrain", "finetune", "quickstart", "merge_lora", "evaluate", "imagine"}
MODULES = sorted(TRAINING.rglob("*.py"))


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 700, f"{_relative(path)}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - start + 1
            assert length <= 100, f"{_relative(path)}:{node.lineno} {node.name} is {length} lines"


def _imported_names(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent != TRAINING or p.stem not in SCRIPT_MODULES],
                         ids=_relative)
def test_libraries_import_no_stage_script(path):
    for name in _imported_names(ast.parse(path.read_text())):
        for script in SCRIPT_MODULES:
            assert name != f"training.{script}" and not name.startswith(f"training.{script}."), (
                f"{_relative(path)} imports the script module {name}"
            )


@pytest.mark.parametrize("path", MODULES + sorted((REPO_ROOT / "benchmarks").glob("*.py")), ids=_relative)
def test_no_sys_path_edits(path):
    assert "sys.path.insert" not in path.read_text(), f"{_relative(path)} edits sys.path; the project is installed"

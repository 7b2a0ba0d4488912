"""Shared test set-up: offline, deterministic, the project importable from the checkout."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco (headless rendering)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True)
def _seed_everything():
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


_BLOCK_THE_PROJECT = f"""
import importlib.abc, sys

BLOCKED = ("processing_lapa", "modeling_lapa", "training", "hub_cards")

class BlockProject(importlib.abc.MetaPathFinder):
    # The editable install puts a finder on sys.meta_path; this one runs first and refuses the project.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the saved folder must carry its own code")
        return None

sys.meta_path.insert(0, BlockProject())
sys.path[:] = [p for p in sys.path if {str(REPO_ROOT)!r} not in p and p not in ("", ".")]
"""


def run_without_the_project(script: str, tmp_path: Path, timeout: int = 300):
    """Run `script` (dedented Python) in `python -I` where the project cannot be imported (its packages blocked,
    the checkout off sys.path): what `trust_remote_code=True` users without this project see. cwd is `tmp_path`,
    remote code goes to a fresh modules cache. Returns the CompletedProcess."""
    import subprocess
    import textwrap

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    code = _BLOCK_THE_PROJECT + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)

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
if str(REPO_ROOT) not in sys.path:  # the checkout under test, before any installed copy
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




@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on 2
    shared cores, spinning threads make small models many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

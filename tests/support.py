"""What several test modules share: paths, the subprocess environments, and the `accelerate launch` harness.

Test modules import it as `support` (pytest puts `tests/` on sys.path, as for any test module)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def subprocess_env(**extra: str) -> dict:
    """The test's environment for a child process: the checkout first on PYTHONPATH, one thread per process (the
    children of a test share 2 cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a launch's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(script: str | Path, *args: str, num_processes: int = 2, timeout: int = 600,
                      env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N script args` on CPU processes, on a free port; returns the
    finished process (stdout and stderr captured as text)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env or subprocess_env(),
                          timeout=timeout)


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


def run_without_the_project(script: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` (dedented Python) in `python -I` where the project cannot be imported (its packages blocked,
    the checkout off sys.path): what `trust_remote_code=True` users without this project see. cwd is `tmp_path`,
    remote code goes to a fresh modules cache. Returns the CompletedProcess."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    code = _BLOCK_THE_PROJECT + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)

"""Two CPU processes under `accelerate launch`: unequal codebook usage per rank, identical codebooks at the end."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_two_process_run_keeps_codebooks_bitwise_identical(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(REPO_ROOT / "tests" / "scripts" / "ddp_codebook_sync.py"), "--output", str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # the usage really differed: the reference's per-rank rule would have replaced different codes
    decisions = [[entry["local_unused"] for entry in r["replacements"]] for r in ranks]
    assert decisions[0] != decisions[1]
    # ours replaced the same codes on both ranks, at least once for real
    replaced = [[entry["replaced"] for entry in r["replacements"]] for r in ranks]
    assert replaced[0] == replaced[1]
    assert any(len(codes) > 0 for codes in replaced[0])
    assert ranks[0]["codebook_hex"] == ranks[1]["codebook_hex"]

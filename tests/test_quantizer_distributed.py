"""Two CPU processes under `accelerate launch`: unequal codebook usage per rank, identical codebooks at the end."""

import json

import pytest

from support import REPO_ROOT, accelerate_launch


@pytest.mark.slow
def test_two_process_run_keeps_codebooks_bitwise_identical(tmp_path):
    result = accelerate_launch(REPO_ROOT / "tests" / "scripts" / "ddp_codebook_sync.py", "--output", tmp_path)
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

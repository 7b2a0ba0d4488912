"""benchmarks/paper_experiment.py: the smoke preset runs every stage of the four methods in both settings on the real
simulator; a second run on the test split reuses every trained stage; the table, JSON and chart say what ran."""

from __future__ import annotations

import json

import pytest

from benchmarks import paper_experiment as pe
from training.data import load_lerobot_dataset
from training.envs.metaworld_tasks import TASK_INSTRUCTIONS


def _info(successes_per_task: dict[str, list[bool]]) -> dict:
    per_task = [{"task": t, "metrics": {"successes": s}} for t, s in successes_per_task.items()]
    total = [x for s in successes_per_task.values() for x in s]
    return {"per_task": per_task, "overall": {"pc_success": 100.0 * sum(total) / len(total)}}


def test_aggregate_pools_seeds_and_computes_the_share_of_the_gap():
    evals = {
        ("scratch", "in_domain"): [_info({"a": [False] * 10}), _info({"a": [True] + [False] * 9})],  # 5%
        ("lapa", "in_domain"): [_info({"a": [True] * 6 + [False] * 4}), _info({"a": [True] * 4 + [False] * 6})],  # 50%
        ("actionvla", "in_domain"): [_info({"a": [True] * 9 + [False]}), _info({"a": [True] * 8 + [False] * 2})],  # 85%
    }
    rows = pe.aggregate(evals)
    lapa = rows["lapa/in_domain"]
    assert lapa["n_episodes"] == 20 and lapa["pc_success"] == 50.0 and lapa["pc_success_per_seed"] == [60.0, 40.0]
    assert lapa["gap_recovered"] == pytest.approx((50 - 5) / (85 - 5))
    low, high = lapa["pc_success_ci95"]
    assert 25 < low < 50 < high < 75
    assert rows["scratch/in_domain"]["gap_recovered"] is None and rows["actionvla/in_domain"]["gap_recovered"] == 1.0
    table = pe.markdown_table(rows, pe.ExperimentConfig(settings=["in_domain"], seeds=[0, 1], eval_episodes=10,
                                                        tasks=["a"]))
    assert "| LAPA | 50.0 [30, 70] (56% of gap) |" in table and "| VPT | - |" in table


def test_bad_settings_are_refused(capsys):
    assert pe.main(["--preset", "smoke", "--methods", "lapa,bc"]) == 2
    assert "unknown methods ['bc']" in capsys.readouterr().err
    assert pe.main(["--preset", "smoke", "--cross-tasks", "reach-v3"]) == 2
    assert "must not see the evaluated tasks" in capsys.readouterr().err
    assert pe.main(["--preset", "smoke", "--finetune-episodes", "3"]) == 2
    assert pe.main(["--preset", "smoke", "--codebook-sweep", "1,4"]) == 2
    assert pe.main(["--preset", "smoke", "--quantizer-mixed-precision", "fp16"]) == 2
    assert "quantizer_mixed_precision must be 'no' or 'bf16'" in capsys.readouterr().err
    config = pe.resolve_config(["--preset", "smoke", "--quantizer-mixed-precision", "bf16", "--video-crf", "0"])
    assert (config.quantizer_mixed_precision, config.video_crf, config.video_pix_fmt) == ("bf16", 0, "yuv420p")
    long = pe.resolve_config(["--preset", "long", "--pretrain-steps", "8000"])
    assert (long.episodes_per_task, long.cross_episodes_per_task, long.video_pix_fmt, long.video_crf,
            long.pretrain_steps, long.finetune_steps) == (100, 25, "yuv444p", 0, 8000, 1600)
    assert (long.quantizer_steps, long.quantizer_mixed_precision) == (4000, "bf16")
    lr = pe.resolve_config(["--preset", "smoke", "--finetune-learning-rate", "1e-4"])
    assert (lr.learning_rate, lr.finetune_learning_rate) == (1e-3, 1e-4)


@pytest.mark.slow
def test_the_smoke_preset_runs_all_four_methods_in_both_settings(tmp_path):
    out = tmp_path / "experiment"
    smoke = ["--preset", "smoke", "--output-dir", str(out), "--finetune-learning-rate", "5e-4"]
    result = pe.run(pe.resolve_config([*smoke, "--split", "validation"]))
    rows = result["rows"]
    assert sorted(rows) == sorted(["scratch/in_domain", "vpt/in_domain", "lapa/in_domain", "actionvla/in_domain",
                                   "vpt/cross_task", "lapa/cross_task", "actionvla/cross_task", "lapa_c4/in_domain"])
    assert all(r["n_episodes"] == 2 for r in rows.values())  # 1 seed x 2 tasks x 1 episode
    # every stage ran: data of both settings, one quantizer and one labelling per setting (and one for the |C| = 4
    # sweep), one IDM, six pretrainings (and the sweep's)
    stages = result["stage_seconds_this_run"]
    assert sorted(name for name in stages if "quantizer" in name) == [
        "cross_task: quantizer", "in_domain: quantizer", "in_domain: quantizer_c4"]
    assert "VPT: inverse dynamics model" in stages
    assert sum("pretraining" in name for name in stages) == 7 and sum("finetuning" in name for name in stages) == 8
    c4 = json.loads((out / "in_domain" / "quantizer_c4" / "model" / "config.json").read_text())
    assert c4["codebook_size"] == 4
    # LAPA pretrains on latent codes, VPT on the IDM's actions, ACTIONVLA on the true ones; SCRATCH starts from nothing
    record = lambda path: json.loads((path / "model" / "training_config.json").read_text())
    assert record(out / "cross_task" / "pretrain_lapa")["target"] == "latent"
    assert record(out / "cross_task" / "pretrain_vpt")["dataset"] == [str(out / "cross_task" / "videos_vpt")]
    assert record(out / "cross_task" / "pretrain_actionvla")["dataset"] == [str(out / "data" / "cross_tasks")]
    assert record(out / "finetune" / "scratch" / "seed0")["init_from"] is None
    # finetuning has its own learning rate; pretraining keeps --learning-rate
    assert record(out / "finetune" / "scratch" / "seed0")["learning_rate"] == 5e-4
    assert record(out / "in_domain" / "pretrain_lapa")["learning_rate"] == 1e-3
    assert record(out / "finetune" / "cross_task_lapa" / "seed0")["init_from"] == str(
        out / "cross_task" / "pretrain_lapa" / "model")
    # the cross-task videos hold none of the evaluated tasks
    cross = load_lerobot_dataset(out / "data" / "cross_tasks")
    instructions = {cross.episode_task(e) for e in range(cross.meta.total_episodes)}
    assert instructions == {TASK_INSTRUCTIONS["reach-wall-v3"], TASK_INSTRUCTIONS["door-close-v3"]}
    video = cross.meta.info["features"]["observation.images.corner"]["info"]
    assert (video["video.pix_fmt"], video["video.crf"]) == ("yuv420p", 23)  # the preset's video settings
    # validation episodes start from the validation seed block
    info = json.loads((out / "eval" / "validation" / "in_domain_lapa" / "seed0" / "eval_info.json").read_text())
    assert info["per_task"][0]["metrics"]["seeds"] == [10**9 + 100 * 10**6]
    diagnostics = result["diagnostics"]
    assert {"quantizer/in_domain", "quantizer/cross_task", "idm", "vpt_pseudo_labels/cross_task"} <= set(diagnostics)
    assert (out / "success_validation.png").stat().st_size > 10_000
    table = (out / "results_validation.md").read_text()
    assert "| ACTIONVLA |" in table and "| 4 | " in table and "| 8 | " in table

    # the test split reuses every trained stage and evaluates on its own seed block
    test = pe.run(pe.resolve_config([*smoke, "--split", "test"]))
    assert all(name.startswith("closed loop (test)") for name in test["stage_seconds_this_run"])
    info = json.loads((out / "eval" / "test" / "scratch" / "seed0" / "eval_info.json").read_text())
    assert info["per_task"][0]["metrics"]["seeds"] == [10**9 + 200 * 10**6]

    # a cached dataset made with other settings is refused, not reused
    with pytest.raises(ValueError, match="generated with other settings.*pix_fmt: yuv420p there, yuv444p here"):
        pe.run(pe.resolve_config([*smoke, "--video-pix-fmt", "yuv444p",
                                  "--video-crf", "0"]))
    # so is a finished training run made with other settings (here the finetuning length), named in the error
    with pytest.raises(ValueError, match=r"finetune/scratch/seed0 holds a finished run with other settings "
                                         r"\(max_steps: 10 there, 20 here\)"):
        pe.run(pe.resolve_config([*smoke, "--finetune-steps", "20"]))
    # and a quantizer of other settings (its steps) as well
    with pytest.raises(ValueError, match=r"in_domain/quantizer holds a finished run.*max_steps: 12 there, 13 here"):
        pe.run(pe.resolve_config([*smoke, "--quantizer-steps", "13"]))

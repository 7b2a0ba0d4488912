"""The README's main job, `python -m training.quickstart`, end to end at a tiny size on the real simulator: expert
data -> quantizer -> labelled dataset -> latent pretraining -> action finetuning -> closed-loop evaluation -> an
imagined rollout GIF, then a rerun that reuses every stage's output."""

import json
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("metaworld")

from transformers import AutoModel  # noqa: E402

import modeling_lapa  # noqa: F401,E402
import processing_lapa  # noqa: F401,E402
from training import quickstart  # noqa: E402
from training.data import load_lerobot_dataset  # noqa: E402


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["--output-dir", str(out), "--tasks", "reach-v3,drawer-open-v3", "--episodes-per-task", "3",
            "--quantizer-steps", "20", "--vla-steps", "8", "--finetune-steps", "8", "--finetune-episodes", "1",
            "--eval-episodes", "1", "--eval-max-steps", "13", "--rollout-steps", "2", "--num-workers", "1"]
    assert quickstart.main(args) == 0
    labelled = load_lerobot_dataset(out / "metaworld_latent")
    assert "latent_action" in labelled.meta.features
    pretrained = AutoModel.from_pretrained(out / "lapa" / "model")
    finetuned = AutoModel.from_pretrained(out / "lapa_finetuned" / "model")
    record = json.loads((out / "lapa_finetuned" / "model" / "training_config.json").read_text())
    assert record["init_from"] == str(out / "lapa" / "model") and len(record["split"]["train_episodes"]) == 2
    dataset_name = finetuned.processor.action_tokenizer.datasets[0]
    assert dataset_name == "metaworld"
    frame = labelled.decode_episode(labelled.episode_indices[0], size=64)[:1]
    actions = finetuned.predict_action(frame, "reach the goal")
    assert actions.shape == (1, 4)
    assert pretrained.predict_latent_actions(frame, "reach the goal").shape == (1, 4)
    # The closed loop: the finetuned policy in the simulator from unseen initial states, with the world model's
    # imagined rollout of each task's first episode beside the real one.
    eval_info = json.loads((out / "eval" / "eval_info.json").read_text())
    assert [entry["task"] for entry in eval_info["per_task"]] == ["reach-v3", "drawer-open-v3"]
    assert eval_info["overall"]["n_episodes"] == 2 and eval_info["policy"]["name"] == str(out / "lapa_finetuned" / "model")
    assert eval_info["world_model"]["vla"] == str(out / "lapa" / "model")
    for entry in eval_info["per_task"]:
        assert entry["metrics"]["steps"][0] <= 13 and len(entry["metrics"]["imagined_psnr_per_step"]) == 2
        assert Path(entry["metrics"]["predicted_video_paths"][0]).is_file()
    with Image.open(out / "rollout.gif") as gif:
        assert gif.n_frames == 3  # the start frame and 2 imagined gaps
    printed = capsys.readouterr().out
    for line in ("=== summary ===", "quantizer (held-out pairs)", "action finetuning (held-out frames)",
                 "closed loop (unseen initial states)", "world model vs real", "imagined rollout GIF"):
        assert line in printed, line
    # A second run finds every stage's output and reuses it.
    assert quickstart.main(args) == 0
    assert printed.count("exists: using it") == 0 and capsys.readouterr().out.count("exists: using it") == 7

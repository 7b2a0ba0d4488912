"""The README's main job, `python -m training.quickstart`, end to end at a tiny size on the real simulator: expert
data -> quantizer -> labelled dataset -> latent pretraining -> action finetuning, then a rerun that reuses every
stage's output."""

import json

import pytest

pytest.importorskip("metaworld")

from transformers import AutoModel  # noqa: E402

import modeling_lapa  # noqa: F401,E402
import processing_lapa  # noqa: F401,E402
from training import quickstart  # noqa: E402
from training.data import load_lerobot_dataset  # noqa: E402


def test_quickstart_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["--output-dir", str(out), "--tasks", "reach-v3,drawer-open-v3", "--episodes-per-task", "3",
            "--max-steps", "20", "--vla-steps", "8", "--finetune-episodes", "1", "--num-workers", "1"]
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
    printed = capsys.readouterr().out
    assert "held-out evaluation of the action finetuning" in printed
    # A second run finds every stage's output and reuses it.
    assert quickstart.main(args) == 0
    assert printed.count("exists: using it") == 0 and capsys.readouterr().out.count("exists: using it") == 5

"""training/pretrain.py and training/finetune.py at tiny sizes: learning above the majority baseline, saved
model + processor, exact resume, LoRA adapter + merge, few-shot finetuning from a pretrained model, bad settings.

The dataset is written in code: each frame is a solid colour (one of four); its latent code in slot 0 and its
action depend on the colour, the other slots are constant, so a model that reads the image beats the majority."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import modeling_lapa  # noqa: F401
import processing_lapa  # noqa: F401
from training.data import LeRobotDatasetWriter
from training.data import LATENT_ACTION_KEY
from training.vla_training import resolve_config, train

COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 240, 240]], dtype=np.uint8)
TASKS = ["open the drawer", "press the button"]
TINY = ["--tiny", "image_size=16", "--tiny", "patch_size=4", "--tiny", "hidden_size=32", "--tiny", "num_layers=1"]


def write_dataset(root: Path, episodes: int = 8, length: int = 12, with_labels: bool = True) -> Path:
    rng = np.random.default_rng(0)
    with LeRobotDatasetWriter(root, fps=10, robot_type="toy_arm", crf=10) as writer:
        for episode in range(episodes):
            colour = rng.integers(0, 4, size=length)
            frames = np.broadcast_to(COLOURS[colour][:, None, None, :], (length, 16, 16, 3)).copy()
            codes = np.stack([colour, np.full(length, 5), np.full(length, 1), (colour + episode % 2) % 8], axis=1)
            action = np.stack([colour / 3.0, -colour / 3.0, rng.normal(0, 0.01, length)], axis=1)
            writer.add_episode({"observation.images.top": frames}, task=TASKS[episode % 2], action=action,
                               extra_frame_columns={LATENT_ACTION_KEY: codes.astype(np.int64)} if with_labels else None)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("toy_vla") / "toy")


def run(stage: str, argv: list[str]) -> dict:
    return train(resolve_config(stage, argv))


def common(dataset: Path, out: Path, steps: int) -> list[str]:
    return ["--dataset", str(dataset), "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "8",
            "--holdout-episodes", "2", "--eval-max-frames", "64", "--log-every", "5", "--report-to", "none",
            "--warmup-steps", "0", *TINY]


def test_pretraining_learns_latent_codes_above_the_majority_and_saves_model_and_processor(dataset, tmp_path):
    out = tmp_path / "pre"
    result = run("pretrain", common(dataset, out, 60) + ["--save-every", "60", "--eval-every", "60",
                                                         "--learning-rate", "3e-3"])
    final = result["eval"]
    assert final["majority_baseline_accuracy"] < 0.8
    assert final["token_accuracy"] > final["majority_baseline_accuracy"] + 0.1, final
    assert final["token_accuracy_per_position"][0] > 0.9  # slot 0 is the colour: read from the image
    model = AutoModel.from_pretrained(out / "model")
    assert model.processor is not None and model.config.latent_sequence_length == 4
    record = json.loads((out / "model" / "training_config.json").read_text())
    assert record["stage"] == "pretrain" and record["target"] == "latent" and len(record["split"]["heldout_episodes"]) == 2
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["final"]["token_accuracy"] == final["token_accuracy"]
    assert (out / "training_curves.png").stat().st_size > 10_000


def test_resume_is_exact(dataset, tmp_path):
    import shutil

    settings = ["--save-every", "3", "--eval-every", "4", "--keep-checkpoints", "3"]
    straight = tmp_path / "straight"
    first = run("pretrain", common(dataset, straight, 6) + settings)
    # A run killed after its step-3 checkpoint: the same folder without what came later.
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "step-0000006")
    shutil.rmtree(killed / "model")
    with pytest.raises(FileExistsError, match="--resume"):
        run("pretrain", common(dataset, killed, 6) + settings)
    result = run("pretrain", common(dataset, killed, 6) + settings + ["--resume"])
    a = load_file(straight / "checkpoints" / "step-0000006" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step-0000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The evaluation at step 4 (after the resume) and the final one agree too.
    assert [(e["step"], e["token_accuracy"]) for e in result["evals"]] == [
        (e["step"], e["token_accuracy"]) for e in first["evals"]]


def test_lora_finetuning_from_the_pretrained_model_and_merge(dataset, tmp_path):
    from training.merge_lora import merge_lora

    pre = tmp_path / "pre"
    run("pretrain", common(dataset, pre, 4) + ["--save-every", "4", "--eval-every", "100"])
    ft = tmp_path / "ft"
    result = run("finetune", common(dataset, ft, 4) + [
        "--init-from", str(pre / "model"), "--lora", "--lora-rank", "4", "--train-episodes-per-task", "1",
        "--save-every", "2", "--eval-every", "100", "--num-action-bins", "256"])
    record = json.loads((ft / "adapter" / "training_config.json").read_text())
    assert len(record["split"]["train_episodes"]) == 2  # one per task
    assert "majority_baseline_action_l1" in result["eval"]
    # Checkpoints of a LoRA run hold the trained weights only.
    saved = load_file(ft / "checkpoints" / "step-0000004" / "model.safetensors")
    assert saved and all("lora" in k or "trainable_tokens" in k for k in saved)
    merged = merge_lora(ft / "adapter", tmp_path / "merged")
    loaded = AutoModel.from_pretrained(tmp_path / "merged")
    assert loaded.processor.action_tokenizer.datasets == ["toy"]
    frame = np.broadcast_to(COLOURS[0], (1, 16, 16, 3)).copy()
    actions = loaded.predict_action(frame, TASKS[0])
    assert actions.shape == (1, 3)
    torch.testing.assert_close(
        merged.predict_action(frame, TASKS[0], return_logits=True)[1],
        loaded.predict_action(frame, TASKS[0], return_logits=True)[1])


def test_scratch_finetuning_learns_actions_above_the_majority_bin(dataset, tmp_path):
    result = run("finetune", common(dataset, tmp_path / "scratch", 60) + [
        "--save-every", "60", "--eval-every", "60", "--num-action-bins", "16", "--learning-rate", "3e-3"])
    final = result["eval"]
    # Dimensions 0 and 1 are the colour: learnable from the image; dimension 2 is noise.
    assert final["token_accuracy_per_position"][0] > 0.9 and final["token_accuracy_per_position"][1] > 0.9
    assert final["token_accuracy"] > final["majority_baseline_accuracy"] + 0.2, final
    assert final["action_l1_teacher_forced"] < final["majority_baseline_action_l1"]


def test_bad_settings_give_clear_errors(dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
        resolve_config("pretrain", ["--config", str(config), "--dataset", str(dataset)])
    with pytest.raises(ValueError, match="Unknown tiny backbone setting"):
        resolve_config("pretrain", ["--dataset", str(dataset), "--tiny", "depth=3"])
    with pytest.raises(ValueError, match="No data"):
        resolve_config("finetune", [])
    with pytest.raises(ValueError, match="target must be"):
        resolve_config("pretrain", ["--dataset", str(dataset), "--target", "actions"])
    unlabelled = write_dataset(tmp_path / "unlabelled", episodes=4, with_labels=False)
    with pytest.raises(KeyError, match="label_latents"):
        run("pretrain", common(unlabelled, tmp_path / "x", 2))


def test_streaming_pretraining_resumes_exactly(dataset, tmp_path):
    import shutil

    settings = ["--save-every", "3", "--eval-every", "100", "--keep-checkpoints", "3", "--streaming"]
    straight = tmp_path / "straight"
    run("pretrain", common(dataset, straight, 6) + settings)
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "step-0000006")
    run("pretrain", common(dataset, killed, 6) + settings + ["--resume"])
    a = load_file(straight / "checkpoints" / "step-0000006" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step-0000006" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_pretrained_backbone_folder_is_wrapped_with_new_tokens(dataset, tmp_path):
    # The path a Hub backbone (e.g. the smolvlm preset) takes, from a local folder: config, tokenizer and weights
    # are read with the Auto classes, the embeddings resized for the new tokens, the old rows kept.
    from transformers import AutoModelForImageTextToText

    from modeling_lapa import tiny_backbone_config
    from processing_lapa import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    # An Idefics3 tokenizer holds the tokens its processor wraps an image in (tests/test_smolvlm_layout.py).
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>"]})
    config = tiny_backbone_config("idefics3", image_size=16, patch_size=4, hidden_size=32, num_layers=1,
                                  vocab_size=len(tokenizer))
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    backbone = AutoModelForImageTextToText.from_config(config)
    folder = tmp_path / "backbone"
    backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "wrapped"
    run("pretrain", ["--dataset", str(dataset), "--output-dir", str(out), "--backbone", str(folder), "--max-steps", "2",
                     "--batch-size", "4", "--eval-max-frames", "8", "--report-to", "none", "--save-every", "2",
                     "--eval-every", "100", "--holdout-episodes", "2"])
    model = AutoModel.from_pretrained(out / "model")
    assert model.config.backbone_family == "idefics3"
    assert model.config.text_vocab_size == len(tokenizer) + 8 + 256
    old_rows = backbone.get_input_embeddings().weight
    # The vision tower is frozen: after training it still equals the backbone's.
    for (name, before), after in zip(backbone.model.vision_model.state_dict().items(),
                                     model.vision_encoder.state_dict().values()):
        assert torch.equal(before, after), name
    assert model.get_input_embeddings().weight.shape[0] == old_rows.shape[0] + 8 + 256


@pytest.mark.slow
def test_two_process_pretraining_under_accelerate_launch(dataset, tmp_path):
    from support import REPO_ROOT, accelerate_launch

    out = tmp_path / "ddp"
    # the vision encoder trains too: DistributedDataParallel refuses trainable parameters the forward never uses
    result = accelerate_launch(REPO_ROOT / "training" / "pretrain.py", *common(dataset, out, 4), "--save-every", "2",
                               "--eval-every", "100", "--no-freeze-vision-encoder")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "model" / "training_config.json").read_text())
    assert record["world_size"] == 2 and record["effective_batch_size"] == 16
    assert (out / "checkpoints" / "step-0000004" / "rank-1.pt").is_file()
    model = AutoModel.from_pretrained(out / "model")
    assert model.predict_latent_actions(np.broadcast_to(COLOURS[1], (1, 16, 16, 3)).copy(), TASKS[1]).shape == (1, 4)


def test_chunked_finetuning_predicts_k_actions_and_records_k(dataset, tmp_path):
    out, k = tmp_path / "chunked", 4
    result = run("finetune", common(dataset, out, 40) + [
        "--save-every", "40", "--eval-every", "40", "--num-action-bins", "16", "--learning-rate", "3e-3",
        "--action-chunk-size", str(k)])
    final, history = result["eval"], result["history"]
    # Held-out metrics over the k x D chunk tokens, time-major; the majority baseline has one bin per position.
    assert len(final["token_accuracy_per_position"]) == k * 3
    assert len(final["majority_baseline_accuracy_per_position"]) == k * 3
    assert history[-1]["loss"] < history[0]["loss"]
    # Teacher-forced, dimension 1 of every step follows from dimension 0 (both are the colour); the colours of the
    # later steps are random, so only the whole chunk against its majority is a fair measure at 40 steps.
    assert final["token_accuracy"] > final["majority_baseline_accuracy"] + 0.2, final
    model = AutoModel.from_pretrained(out / "model").eval()
    assert model.config.action_chunk_size == k and model.processor.action_chunk_size == k
    assert json.loads((out / "model" / "config.json").read_text())["action_chunk_size"] == k
    assert json.loads((out / "model" / "training_config.json").read_text())["action_chunk_size"] == k
    frame = np.broadcast_to(COLOURS[1], (1, 16, 16, 3)).copy()
    assert model.predict_action(frame, TASKS[0]).shape == (1, k, 3)
    with pytest.raises(ValueError, match="needs target='action'"):
        resolve_config("pretrain", ["--dataset", str(dataset), "--action-chunk-size", "2"])
    with pytest.raises(ValueError, match="action_chunk_size must be >= 1"):
        resolve_config("finetune", ["--dataset", str(dataset), "--action-chunk-size", "0"])


def test_finetuning_stops_once_the_training_accuracy_reaches_the_target(dataset, tmp_path):
    """The paper's rule ("finetune until the training action accuracy reaches 95%"): the run ends at the first log
    line at or above the target, saves a checkpoint and the model there, and records that it stopped early."""
    out = tmp_path / "early"
    argv = common(dataset, out, 200) + ["--save-every", "200", "--eval-every", "200", "--num-action-bins", "16",
                                        "--learning-rate", "3e-3", "--stop-at-train-accuracy", "0.7"]
    result = run("finetune", argv)
    assert result["step"] < 200 and result["step"] % 5 == 0
    assert result["history"][-1]["token_accuracy"] >= 0.7 > result["history"][-2]["token_accuracy"]
    training = json.loads((out / "eval_metrics.json").read_text())["training"]
    assert training == {"steps": result["step"], "stopped_early": True,
                        "final_train_token_accuracy": result["history"][-1]["token_accuracy"]}
    assert (out / "checkpoints" / f"step-{result['step']:07d}").is_dir()
    assert result["eval"]["step"] == result["step"] and (out / "model" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="stop_at_train_accuracy"):
        resolve_config("finetune", common(dataset, tmp_path / "x", 5) + ["--stop-at-train-accuracy", "1.5"])

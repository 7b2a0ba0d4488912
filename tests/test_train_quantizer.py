"""training/train_quantizer.py: settings resolution, exact resume after a kill, 2-process training in sync."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from support import REPO_ROOT, accelerate_launch, subprocess_env
from training.data import LeRobotDatasetWriter, split_episodes
from training.train_quantizer import resolve_config

SCRIPT = str(REPO_ROOT / "training" / "train_quantizer.py")
TINY_MODEL = dict(hidden_size=32, quant_dim=8, codebook_size=8, code_seq_len=4, image_size=32, patch_size=4,
                  spatial_depth=1, temporal_depth=1, num_heads=2, head_dim=16)


def write_moving_square_dataset(root, episodes=6, length=24, size=32, fps=10, seed=0):
    """A LeRobot v3.0 dataset: a square moving at a constant per-episode velocity; the action is that velocity."""
    rng = np.random.default_rng(seed)
    with LeRobotDatasetWriter(root, fps=fps, crf=18) as writer:
        for e in range(episodes):
            velocity = rng.integers(-2, 3, size=2)
            y, x = rng.integers(8, size - 16, size=2)
            frames = np.zeros((length, size, size, 3), dtype=np.uint8)
            state = np.zeros((length, 2), dtype=np.float32)
            for t in range(length):
                py = int(np.clip(y + velocity[0] * t, 0, size - 6))
                px = int(np.clip(x + velocity[1] * t, 0, size - 6))
                frames[t, py : py + 6, px : px + 6] = (255, 200, 60)
                state[t] = (py, px)
            action = np.repeat(velocity[None].astype(np.float32), length, axis=0)
            writer.add_episode({"observation.images.cam": frames}, task=f"move {'up' if e % 2 else 'down'}",
                               state=state, action=action)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_moving_square_dataset(tmp_path_factory.mktemp("squares") / "ds")


def run_config(tmp_path, dataset, **overrides):
    settings = dict(dataset=[str(dataset)], model=TINY_MODEL, batch_size=8, max_steps=12, save_every=4, eval_every=100,
                    log_every=4, gap_seconds=0.2, holdout_episodes=2, learning_rate=1e-3, eval_max_pairs=64,
                    probe_train_pairs=64, eval_batch_size=32, report_to="none", seed=3,
                    replacement_cooldown_steps=0)  # these short runs test replacement itself
    settings.update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_settings_resolve_defaults_preset_file_then_command_line(tmp_path):
    reference = resolve_config(["--preset", "reference", "--dataset", "d"])
    assert (reference.learning_rate, reference.adam_betas, reference.max_grad_norm, reference.batch_size) == (1e-4, [0.9, 0.99], 0.5, 64)
    assert (reference.weight_decay, reference.gap_seconds, reference.max_steps, reference.model_preset) == (0.0, 0.6, 100_000, "reference")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"preset": "tiny", "learning_rate": 2e-4, "dataset": ["a"], "model": {"hidden_size": 64}}))
    c = resolve_config(["--config", str(tmp_path / "c.yaml"), "--batch-size", "7", "--model", "num_heads=2"])
    assert c.learning_rate == 2e-4 and c.batch_size == 7
    # the file's and the command line's model settings add to the tiny preset's
    assert c.model == {"codebook_per_slot": True, "replacement_noise": 0.1, "replacement_min_share": 0.03,
                       "hidden_size": 64, "num_heads": 2}
    assert resolve_config(["--preset", "reference", "--dataset", "d"]).model == {}  # the reference stays the reference
    assert c.model_preset == "tiny" and c.dataset == ["a"]
    c = resolve_config(["--dataset", "a", "--adam-betas", "[0.8, 0.9]", "--mixed-precision", "bf16", "--compile"])
    assert c.adam_betas == [0.8, 0.9] and c.mixed_precision == "bf16" and c.compile
    assert not reference.compile and reference.mixed_precision == "no"  # speed options are off in the presets


def test_unknown_or_bad_settings_are_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"learning_rat": 1e-3, "dataset": ["a"]}))
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'\?\)"):
        resolve_config(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit):
        resolve_config(["--dataset", "a", "--learning-rat", "1"])
    with pytest.raises(ValueError, match="No data"):
        resolve_config([])
    with pytest.raises(ValueError, match="Unknown quantizer setting"):
        resolve_config(["--dataset", "a", "--model", "hidden=3"])
    with pytest.raises(ValueError, match="one weight per source"):
        resolve_config(["--dataset", "a", "--dataset", "b", "--mix-weights", "[1.0]"])
    with pytest.raises(ValueError, match="one --labels file per --video-folder"):
        resolve_config(["--video-folder", "v"])


def test_holdout_split_is_stratified_and_reproducible(dataset):
    from training.data import load_lerobot_dataset

    source = load_lerobot_dataset(dataset)
    train, held = split_episodes(source, 2, seed=0)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == list(range(6))
    assert {source.episode_task(e) for e in held} == {"move up", "move down"}
    assert split_episodes(source, 2, seed=0) == (train, held)
    train, held = split_episodes(source, 0.34, seed=1)
    assert len(held) == 2


def _train(args, env, **kwargs):
    return subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _env():
    return subprocess_env()


def _same_weights(a_dir, b_dir):
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_killed_and_resumed_run_matches_an_uninterrupted_run(tmp_path, dataset):
    # 40 steps over epochs of 12 batches (4 training episodes of the moving squares), every checkpoint kept. The run is
    # killed once its step-16 checkpoint exists, then resumed from step 16 (in the middle of the second epoch) and,
    # once more, from step 12 (the end of the first epoch): both must end bitwise where the uninterrupted run ends.
    config = run_config(tmp_path, dataset, max_steps=40, keep_checkpoints=20)
    env = _env()
    straight = _train(["--config", str(config), "--output-dir", str(tmp_path / "straight")], env)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "straight" / "checkpoints" / "step-0000016" / "trainer_state.json").read_text())[
        "epoch"] == 1  # the premise: step 16 lies in the second epoch

    run_dir = tmp_path / "killed"
    killed = _train(["--config", str(config), "--output-dir", str(run_dir)], env)
    checkpoint = run_dir / "checkpoints" / "step-0000016" / "trainer_state.json"
    deadline = time.time() + 300
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "the run never wrote its step-16 checkpoint"
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)

    refused = _train(["--config", str(config), "--output-dir", str(run_dir)], env)
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode != 0 and "--resume" in out  # no silent restart over an existing run

    for resume_step in (16, 12):
        for later in (run_dir / "checkpoints").glob("step-*"):
            if int(later.name.split("-")[1]) > resume_step:
                shutil.rmtree(later)
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        resumed = _train(["--config", str(config), "--output-dir", str(run_dir), "--resume"], env)
        out, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, out[-3000:]
        assert f"step {resume_step}," in out and "resumed from" in out
        _same_weights(tmp_path / "straight" / "model", run_dir / "model")
    state = json.loads((run_dir / "checkpoints" / "step-0000040" / "trainer_state.json").read_text())
    assert state["step"] == 40


def test_two_process_training_keeps_identical_codebooks(tmp_path, dataset):
    config = run_config(tmp_path, dataset, max_steps=20, save_every=10, model={**TINY_MODEL, "replacement_steps": [5, 10, 15, 20]})
    result = accelerate_launch(SCRIPT, "--config", config, "--output-dir", tmp_path / "ddp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "replaced" in result.stderr + result.stdout
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-0000020" / "trainer_state.json").read_text())
    checks = state["codebook_sync_checks"]
    assert [c["step"] for c in checks] == [10, 20]
    assert all(c["codebooks_identical"] and c["world_size"] == 2 for c in checks)
    assert state["config"]["effective_batch_size"] == 16


def test_two_sources_are_mixed_in_training_and_evaluated_each_on_its_own(tmp_path, dataset):
    other = write_moving_square_dataset(tmp_path / "other", episodes=4, seed=1)
    config = run_config(tmp_path, dataset, mix_weights=[3, 1], max_steps=4, save_every=4, holdout_episodes=2)
    settings = yaml.safe_load(config.read_text())
    settings["dataset"] = [str(dataset), str(other)]
    config.write_text(yaml.safe_dump(settings))
    proc = _train(["--config", str(config), "--output-dir", str(tmp_path / "mixed")], _env())
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    final = json.loads((tmp_path / "mixed" / "eval" / "final_metrics.json").read_text())
    assert sorted(final["sources"]) == sorted([str(dataset), str(other)])
    for i, metrics in enumerate(final["sources"].values()):
        assert metrics["num_episodes"] == 2 and metrics["probes"]["available"]
        assert (tmp_path / "mixed" / "eval" / "step-0000004" / f"source-{i}" / "metrics.json").is_file()


def test_replacement_stops_before_the_end_of_a_run_and_numbers_parse():
    from training.train_quantizer import build_model

    # The tiny preset stops replacing 500 steps before its end, so the final codebook has no code replaced too late
    # to take pairs; the reference preset keeps the reference schedule (it ends at step 4500 of 100k).
    tiny = resolve_config(["--dataset", "x", "--max-steps", "3000", "--learning-rate", "3e-4"])
    assert tiny.learning_rate == 3e-4 and isinstance(tiny.learning_rate, float)  # YAML 1.1 would read a string
    steps = build_model(tiny).config.replacement_steps
    assert steps[-1] == 2500 and 3000 not in steps and steps[:3] == [10, 20, 30]
    short = build_model(resolve_config(["--dataset", "x", "--max-steps", "1000"])).config.replacement_steps
    assert short[-1] == 500
    reference = resolve_config(["--dataset", "x", "--preset", "reference", "--model", "hidden_size=64"])
    assert reference.replacement_cooldown_steps == 0

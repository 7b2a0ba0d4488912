"""training/evaluate.py and training/eval/closed_loop.py on the real Meta-World simulator, at micro size: the
eval_info.json layout and its Wilson intervals, videos and chart, a tiny VLA acting in the loop, the check of the
evaluation's initial states against the training data's, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.envs.metaworld_data import GenerationConfig, generate_dataset
from training.eval import (
    EVAL_SEED_BASE,
    evaluation_seeds,
    load_policy,
    run_closed_loop,
    wilson_interval,
)
from training.evaluate import EvaluationConfig, evaluate, main, prepare

TASKS = "reach-v3,drawer-close-v3"
DATA_SIZE = 32  # the tiny dataset's (and VLA's) image size


def _build_vla(folder: Path, *, fit_actions: bool = True, training_config: dict | None = None,
               action_chunk_size: int = 1) -> Path:
    """A tiny untrained LAPA VLA + processor saved as a policy folder (as tests/test_vla_model.py builds one)."""
    from modeling_lapa import LAPAConfig, LAPAForActionPrediction, count_image_tokens, tiny_backbone_config
    from processing_lapa import LAPAImageProcessor, LAPAProcessor, build_tiny_tokenizer

    torch.manual_seed(0)
    backbone = tiny_backbone_config("llava", image_size=DATA_SIZE, patch_size=8, hidden_size=64, num_layers=2)
    processor = LAPAProcessor.from_components(
        build_tiny_tokenizer(), LAPAImageProcessor(size=DATA_SIZE), num_latent_codes=8, latent_sequence_length=4,
        num_action_bins=16, num_image_tokens=count_image_tokens(backbone), action_chunk_size=action_chunk_size)
    if fit_actions:
        rng = np.random.default_rng(0)
        actions = np.concatenate([rng.uniform(-1, 1, (200, 3)), rng.choice([-1.0, 1.0], (200, 1))], axis=1)
        processor.fit_action_tokenizer(actions.astype(np.float32), dataset="data", gripper_dims=[3])
    model = LAPAForActionPrediction(LAPAConfig.from_processor(backbone, processor)).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if training_config is not None:
        (folder / "training_config.json").write_text(json.dumps(training_config))
    return folder


@pytest.fixture(scope="module")
def overlapping_dataset(tmp_path_factory):
    """A real generated dataset whose episode seeds are the evaluation seeds of --seed 0 (run seed 1000 =
    EVAL_SEED_BASE), with reach-v3 only."""
    from training.envs import eval_episodes, metaworld_data

    assert eval_episodes.EPISODE_SEED_STRIDE == metaworld_data.EPISODE_SEED_STRIDE
    assert EVAL_SEED_BASE == 1000 * metaworld_data.EPISODE_SEED_STRIDE
    root = tmp_path_factory.mktemp("data") / "data"
    generate_dataset(GenerationConfig(tasks=("reach-v3",), episodes_per_task=2, image_size=DATA_SIZE, max_steps=5,
                                      seed=1000), root, progress=False)
    from training.data import LeRobotDatasetMetadata

    assert [ep["episode_seed"] for ep in LeRobotDatasetMetadata(root).episodes] == evaluation_seeds(0, 2)
    return root


@pytest.fixture(scope="module")
def vla_folder(tmp_path_factory, overlapping_dataset):
    folder = tmp_path_factory.mktemp("vla") / "model"
    return _build_vla(folder, training_config={"dataset": [str(overlapping_dataset)], "camera_key": None,
                                               "init_from": None, "dataset_key": "data"})


def _config(tmp_path, **settings) -> EvaluationConfig:
    base = dict(tasks=TASKS, episodes_per_task=2, output_dir=str(tmp_path / "eval"), progress=False,
                batch_size=3, num_workers=2)
    return EvaluationConfig(**{**base, **settings})


def test_expert_writes_lerobot_layout_with_intervals_videos_and_chart(tmp_path):
    info = evaluate(_config(tmp_path, policy="expert", max_steps=120))
    out = tmp_path / "eval"
    assert json.loads((out / "eval_info.json").read_text()) == json.loads(json.dumps(info))
    assert [entry["task"] for entry in info["per_task"]] == ["reach-v3", "drawer-close-v3"]
    seeds = evaluation_seeds(0, 2)
    for task_id, entry in enumerate(info["per_task"]):
        assert entry["task_group"] == "custom" and entry["task_id"] == task_id
        metrics = entry["metrics"]
        assert set(metrics) >= {"sum_rewards", "max_rewards", "successes", "video_paths", "seeds", "steps"}
        assert metrics["successes"] == [True, True]  # the expert solves both within 120 steps
        assert metrics["seeds"] == seeds and all(1 <= s < 120 for s in metrics["steps"])
        assert all(m <= s for m, s in zip(metrics["max_rewards"], metrics["sum_rewards"]))
        low, high = wilson_interval(2, 2)
        assert entry["pc_success"] == 100.0 and entry["pc_success_ci95"] == pytest.approx([100 * low, 100 * high])
        # One video per task (the first episode): one frame before each action and the last one, 64 px.
        assert len(metrics["video_paths"]) == 1
        import av

        with av.open(metrics["video_paths"][0]) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == metrics["steps"][0] + 1 and frames[0].shape == (64, 64, 3)
    group = info["per_group"]["custom"]
    overall = info["overall"]
    for block in (group, overall):
        assert block["n_episodes"] == 4 and block["pc_success"] == 100.0
        assert set(block) >= {"avg_sum_reward", "avg_max_reward", "pc_success", "n_episodes", "video_paths",
                              "pc_success_ci95"}
        assert len(block["video_paths"]) == 2
    assert overall["pc_success_ci95"] == pytest.approx([100 * v for v in wilson_interval(4, 4)])
    assert overall["eval_s"] > 0 and overall["eval_ep_s"] == pytest.approx(overall["eval_s"] / 4)
    assert info["policy"]["name"] == "expert" and info["config"]["episodes_per_task"] == 2
    assert info["versions"]["metaworld"] and info["settings"]["camera"] == "corner"
    assert (out / "success_per_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_zero_policy_fails_every_episode_at_the_step_limit(tmp_path, capsys):
    out = tmp_path / "zero"
    argv = ["--policy", "zero", "--tasks", "reach", "--episodes-per-task", "2", "--max-steps", "15",
            "--videos-per-task", "0", "--output-dir", str(out), "--no-progress", "--batch-size", "2"]
    assert main(argv) == 0
    info = json.loads((out / "eval_info.json").read_text())
    metrics = info["per_task"][0]["metrics"]
    assert metrics["successes"] == [False, False] and metrics["steps"] == [15, 15] and metrics["video_paths"] == []
    assert info["overall"]["pc_success"] == 0.0 and info["overall"]["pc_success_ci95"][0] == 0.0
    assert not (out / "videos").exists() or not any((out / "videos").iterdir())
    assert "overall" in capsys.readouterr().out
    # The same folder again is refused without --overwrite.
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_episodes_do_not_depend_on_batch_size_or_workers():
    policy = load_policy("expert")
    kwargs = dict(episodes_per_task=3, max_steps=60, videos_per_task=0, progress=False)
    one = run_closed_loop(policy, ["reach-v3"], batch_size=1, num_workers=1, **kwargs)
    three = run_closed_loop(policy, ["reach-v3"], batch_size=3, num_workers=2, **kwargs)
    assert [(e.seed, e.steps, e.sum_reward, e.success) for e in one.episodes["reach-v3"]] == \
        [(e.seed, e.steps, e.sum_reward, e.success) for e in three.episodes["reach-v3"]]
    assert one.first_episode_frames == {}  # no video episode kept no frames


def test_vla_uses_its_training_camera_and_size_and_refuses_overlapping_seeds(tmp_path, vla_folder,
                                                                               overlapping_dataset):
    # Run seed 1000 of the data generator = the evaluation seeds of --seed 0: refused, naming the task.
    with pytest.raises(ValueError, match="overlap.*reach-v3"):
        prepare(_config(tmp_path, policy=str(vla_folder), seed=0))
    # Through an init_from chain too (a finetuned model whose base was trained on that data).
    child = _build_vla(tmp_path / "child", training_config={"dataset": [], "init_from": str(vla_folder)})
    with pytest.raises(ValueError, match="overlap"):
        prepare(_config(tmp_path, policy=str(child), seed=0))
    # The dataset has no drawer-close-v3 episode: no overlap for that task alone.
    prepare(_config(tmp_path, policy=str(vla_folder), seed=0, tasks="drawer-close-v3"))
    # Another seed: accepted, and the camera and image size come from the dataset's info.json.
    setup = prepare(_config(tmp_path, policy=str(vla_folder), seed=1))
    assert setup["settings"]["camera"] == "corner" and setup["settings"]["image_size"] == DATA_SIZE
    assert setup["seed_check"]["checked"] == [str(overlapping_dataset)]
    with pytest.raises(ValueError, match=f"--image-size 64.*{DATA_SIZE}"):
        prepare(_config(tmp_path, policy=str(vla_folder), seed=1, image_size=64))
    with pytest.raises(ValueError, match="--camera topview.*corner"):
        prepare(_config(tmp_path, policy=str(vla_folder), seed=1, camera="topview"))


def test_vla_acts_in_the_closed_loop(tmp_path, vla_folder):
    info = evaluate(_config(tmp_path, policy=str(vla_folder), seed=1, tasks="reach-v3", max_steps=4, batch_size=2))
    metrics = info["per_task"][0]["metrics"]
    assert metrics["steps"] == [4, 4] and metrics["seeds"] == evaluation_seeds(1, 2)
    assert info["policy"]["kind"] == "vla" and info["seed_check"]["overlap"] is False
    import av

    with av.open(metrics["video_paths"][0]) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (DATA_SIZE, DATA_SIZE, 3)


@pytest.mark.parametrize("settings, message", [
    (dict(policy="expert", tasks="reach-v3,fly-to-the-moon"), "Unknown Meta-World task"),
    (dict(policy="expert", episodes_per_task=0), "episodes-per-task"),
    (dict(policy="expert", max_steps=0), "max-steps"),
    (dict(policy=None), "--policy is required"),
    (dict(policy="expert", camera="ceiling"), "unknown --camera"),
    (dict(policy="expert", image_size=33), "must be even"),
])
def test_bad_settings_are_refused_before_any_simulator_starts(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **settings)


def test_bad_policies_are_refused_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match="no such folder"):
        load_policy(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_policy(str(tmp_path / "empty"))
    (tmp_path / "quantizer").mkdir()
    (tmp_path / "quantizer" / "config.json").write_text(json.dumps({"model_type": "lapa_quantizer"}))
    with pytest.raises(ValueError, match="not a LAPA VLA"):
        load_policy(str(tmp_path / "quantizer"))
    latent_only = _build_vla(tmp_path / "latent", fit_actions=False)
    with pytest.raises(ValueError, match="latent-only"):
        load_policy(str(latent_only))
    assert main(["--policy", str(tmp_path / "missing"), "--tasks", "reach", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["--policy", "expert", "--tasks", "nope"]) == 2
    assert "Unknown Meta-World task" in capsys.readouterr().err


def test_vla_without_its_training_data_uses_the_processor_size_and_warns(tmp_path, capsys):
    folder = _build_vla(tmp_path / "hub-like")  # no training_config.json: like a model from the Hub
    setup = prepare(_config(tmp_path, policy=str(folder)))
    assert setup["settings"]["camera"] == "corner" and setup["settings"]["image_size"] == DATA_SIZE
    assert setup["seed_check"] is None and "not known" in capsys.readouterr().err


def _build_quantizer(folder: Path, codebook_size: int = 8) -> Path:
    from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel

    torch.manual_seed(0)
    config = LAPAQuantizerConfig(hidden_size=32, quant_dim=8, codebook_size=codebook_size, code_seq_len=4,
                                 image_size=DATA_SIZE, patch_size=4, spatial_depth=1, temporal_depth=1, num_heads=2,
                                 head_dim=16, gap_seconds=0.6)
    LAPAQuantizerModel(config).eval().save_pretrained(folder)
    return folder


def test_world_model_imagines_each_tasks_first_episode_beside_the_real_one(tmp_path, vla_folder):
    from training.envs.metaworld_tasks import task_instruction
    from training.eval import imagine, load_vla
    from training.labelling import load_quantizer

    quantizer_dir = _build_quantizer(tmp_path / "quantizer")
    info = evaluate(_config(tmp_path, policy=str(vla_folder), seed=1, tasks="reach-v3", max_steps=13, batch_size=2,
                            quantizer=str(quantizer_dir), imagine_steps=5))
    metrics = info["per_task"][0]["metrics"]
    # 13 steps give 14 real frames; one gap is 0.6 s x 10 fps = 6 control steps: frames 0, 6, 12 -> 2 imagined steps.
    assert info["world_model"]["gap_control_steps"] == 6 and info["world_model"]["vla"] == str(vla_folder)
    assert len(metrics["imagined_codes"]) == 2 and len(metrics["imagined_psnr_per_step"]) == 2
    assert info["overall"]["imagined_psnr_per_step"] == metrics["imagined_psnr_per_step"]
    import av

    with av.open(metrics["predicted_video_paths"][0]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape[1] > 2 * frames[0].shape[0] / 1.5  # imagined | real, side by side
    # Recomputed: the episode's first frame rendered again (the same seed gives the same initial state) and the
    # rollout imagined from it give the codes the evaluation recorded.
    from training.envs.metaworld_env import MetaWorldTaskEnv

    with MetaWorldTaskEnv("reach-v3", image_size=DATA_SIZE) as env:
        env.reset(metrics["seeds"][0])
        first = env.render()["corner"]
    quantizer, _ = load_quantizer(quantizer_dir)
    rollout = imagine(load_vla(vla_folder), quantizer, first, task_instruction("reach-v3"), 2)
    assert rollout.codes.tolist() == metrics["imagined_codes"]
    held_still = metrics["held_still_psnr_per_step"]
    assert len(held_still) == 2 and all(np.isfinite(held_still))


def test_world_model_settings_are_checked_before_any_simulator_starts(tmp_path, vla_folder):
    with pytest.raises(ValueError, match="needs --quantizer"):
        _config(tmp_path, policy=str(vla_folder), world_model_vla=str(vla_folder))
    mismatched = _build_quantizer(tmp_path / "q4", codebook_size=4)
    with pytest.raises(ValueError, match="codebook has 4 codes"):
        prepare(_config(tmp_path, policy=str(vla_folder), quantizer=str(mismatched), seed=1))
    with pytest.raises(ValueError, match="not a folder"):
        prepare(_config(tmp_path, policy=str(vla_folder), quantizer=str(tmp_path / "nothing"), seed=1))
    with pytest.raises(ValueError, match="predicts latent actions"):
        prepare(_config(tmp_path, policy="expert", quantizer=str(mismatched)))


# -- action chunks ---------------------------------------------------------------------------------------------------
class CountingPolicy:
    """A policy wrapper that records the rows of every call."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []
        self.name, self.needs_images = policy.name, policy.needs_images
        self.action_chunk_size = getattr(policy, "action_chunk_size", 1)

    def act(self, images, observations, instructions, tasks):
        self.calls.append(len(observations))
        return self.policy.act(images, observations, instructions, tasks)

    def act_chunk(self, images, observations, instructions, tasks):
        self.calls.append(len(observations))
        return self.policy.act_chunk(images, observations, instructions, tasks)


@pytest.fixture(scope="module")
def chunked_vla_folder(tmp_path_factory):
    return _build_vla(tmp_path_factory.mktemp("chunked") / "model", action_chunk_size=4)


def test_action_queues_open_loop_and_temporal_ensemble_formula():
    from training.eval.action_queues import ActionQueues

    chunk = np.arange(12, dtype=np.float32).reshape(4, 3)  # k = 4 actions of 3 values
    queues = ActionQueues(4, n_action_steps=2)
    assert queues.needs_policy(0)
    queues.add(0, chunk)
    np.testing.assert_array_equal(queues.pop(0), chunk[0])
    assert not queues.needs_policy(0)
    np.testing.assert_array_equal(queues.pop(0), chunk[1])
    assert queues.needs_policy(0)  # n = 2 used up: re-plan
    queues.add(0, chunk)
    queues.reset(0)  # a new episode drops what is left
    assert queues.needs_policy(0)
    # Temporal ensembling: at step t, the chunks of steps t-3..t each predict step t; w_i = exp(-m i), i = 0 oldest.
    m = 0.5
    ensemble = ActionQueues(4, temporal_ensemble=True, ensemble_coefficient=m)
    chunks = [np.random.default_rng(t).normal(size=(4, 3)).astype(np.float32) for t in range(6)]
    for t, new in enumerate(chunks):
        assert ensemble.needs_policy(0)
        ensemble.add(0, new)
        issued = list(range(max(0, t - 3), t + 1))  # oldest first
        weights = np.exp(-m * np.arange(len(issued)))
        expected = sum(w * chunks[s][t - s] for w, s in zip(weights, issued)) / weights.sum()
        np.testing.assert_allclose(ensemble.pop(0), expected, rtol=1e-5, atol=1e-6)


def test_chunking_vla_is_called_once_per_n_action_steps_and_each_new_episode_replans(chunked_vla_folder):
    policy = CountingPolicy(load_policy(str(chunked_vla_folder)))
    assert policy.action_chunk_size == 4
    # 3 episodes of 5 steps on 2 slots, n = 2: episodes 0 and 1 together (calls at steps 0, 2, 4 on 2 rows), then
    # episode 2 alone on a fresh queue (its step 0 must not run episode 0's leftover action).
    result = run_closed_loop(policy, ["reach-v3"], episodes_per_task=3, max_steps=5, batch_size=2, num_workers=2,
                             videos_per_task=0, progress=False, n_action_steps=2, seed=1)
    assert [e.steps for e in result.episodes["reach-v3"]] == [5, 5, 5]
    assert policy.calls == [2, 2, 2, 1, 1, 1]
    assert result.settings["action_chunk_size"] == 4 and result.settings["n_action_steps"] == 2
    # Temporal ensembling asks at every step; the default n is k (one call per 4 steps).
    policy.calls.clear()
    run_closed_loop(policy, ["reach-v3"], episodes_per_task=1, max_steps=5, batch_size=1, num_workers=1,
                    videos_per_task=0, progress=False, temporal_ensemble=True, seed=1)
    assert policy.calls == [1] * 5
    policy.calls.clear()
    run_closed_loop(policy, ["reach-v3"], episodes_per_task=1, max_steps=5, batch_size=1, num_workers=1,
                    videos_per_task=0, progress=False, seed=1)
    assert policy.calls == [1, 1]
    with pytest.raises(ValueError, match="n_action_steps=5 exceeds the policy's action_chunk_size=4"):
        run_closed_loop(policy, ["reach-v3"], episodes_per_task=1, max_steps=5, progress=False, n_action_steps=5)


def test_chunk_execution_settings_are_checked_before_any_simulator_starts(tmp_path, chunked_vla_folder):
    with pytest.raises(ValueError, match="n-action-steps must be an integer >= 1"):
        _config(tmp_path, policy="expert", n_action_steps=0)
    with pytest.raises(ValueError, match="temporal-ensemble calls the policy at every step"):
        _config(tmp_path, policy="expert", temporal_ensemble=True, n_action_steps=2)
    with pytest.raises(ValueError, match="exceeds the policy's action_chunk_size=1"):
        prepare(_config(tmp_path, policy="expert", n_action_steps=2))
    with pytest.raises(ValueError, match="exceeds the policy's action_chunk_size=4"):
        prepare(_config(tmp_path, policy=str(chunked_vla_folder), n_action_steps=5))
    assert main(["--policy", "expert", "--tasks", "reach-v3", "--n-action-steps", "3"]) == 2
    from training.eval.action_queues import ActionQueues

    with pytest.raises(ValueError, match="action_chunk_size must be an integer >= 1"):
        ActionQueues(0)


def test_chunking_vla_in_evaluate_records_its_execution(tmp_path, chunked_vla_folder):
    info = evaluate(_config(tmp_path, policy=str(chunked_vla_folder), tasks="reach-v3", max_steps=3, batch_size=2,
                            temporal_ensemble=True))
    assert info["per_task"][0]["metrics"]["steps"] == [3, 3]
    assert info["settings"]["temporal_ensemble"] is True and info["settings"]["ensemble_coefficient"] == 0.01
    assert info["config"]["temporal_ensemble"] is True

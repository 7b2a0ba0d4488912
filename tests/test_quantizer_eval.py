"""Held-out quantizer evaluation (training/eval/) on a real (tiny) LeRobot v3.0 dataset of a moving square whose
per-step displacement is the action: metrics against direct computations, the probes on synthetic arrays, the
window-mean action target, plots and JSON, and a video folder without actions."""

import json

import numpy as np
import pytest
import torch

from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from training.data import FramePairDataset, LeRobotDatasetWriter, VideoFolderDataset, encode_video, load_lerobot_dataset
from training.eval.actions import action_targets, window_mean_actions
from training.eval.encoding import choose_rows, encode_pairs
from training.eval.metrics import codebook_metrics, scalar_metrics
from training.eval.plots import plot_codebook_usage
from training.eval.probes import MLPProbe, RidgeProbe, r2_per_dimension, run_probes
from training.eval.quantizer import evaluate_quantizer

IMAGE_SIZE, SQUARE, FPS, NUM_FRAMES = 32, 8, 10, 16
GAP_SECONDS = 0.2  # 2 frames at 10 fps
TRAIN_EPISODES, HELD_OUT_EPISODES = list(range(0, 9)), list(range(9, 13))
ACTION_NAMES = ["delta_x", "delta_y", "gripper"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The module's tests run in about 20 s on 2 loaded cores; a briefly trained quantizer does not yet carry the
# motion in its latents, so training is left to the real runs: here the numbers are checked against direct
# computations on an untrained model, and the probes on arrays with known content.


@pytest.fixture(autouse=True)
def _one_thread():
    """The tests share 2 cores with other jobs: one thread avoids oversubscription (several times faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> LAPAQuantizerConfig:
    sizes = dict(hidden_size=32, quant_dim=8, codebook_size=4, code_seq_len=4, image_size=IMAGE_SIZE, patch_size=4,
                 spatial_depth=1, temporal_depth=1, num_heads=2, head_dim=16)
    return LAPAQuantizerConfig(**{**sizes, **overrides})


def moving_square_episode(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(frames (T, S, S, 3) uint8, actions (T, 3) float32): a bright square on a dark floor taking random steps of
    -2..2 px per axis (reflected at the borders); the action at t is the step from t to t+1 (0 at the last frame),
    plus a random +-1 "gripper" that nothing shows. Positions do not reveal the next step, the frame pair does."""
    limit = IMAGE_SIZE - SQUARE
    position = rng.integers(0, limit + 1, size=2)
    color = rng.integers(150, 256, size=3)
    frames = np.zeros((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    frames[:] = 30
    actions = np.zeros((NUM_FRAMES, 3), dtype=np.float32)
    for t in range(NUM_FRAMES):
        y, x = position
        frames[t, y : y + SQUARE, x : x + SQUARE] = color
        step = rng.integers(-2, 3, size=2)
        new_position = position + step
        new_position = np.where(new_position < 0, -new_position, new_position)
        new_position = np.where(new_position > limit, 2 * limit - new_position, new_position)
        if t < NUM_FRAMES - 1:
            actions[t, 0], actions[t, 1] = new_position[1] - position[1], new_position[0] - position[0]
        actions[t, 2] = rng.choice([-1.0, 1.0])
        position = new_position
    return frames, actions


@pytest.fixture(scope="module")
def square_dataset(tmp_path_factory):
    """A LeRobot v3.0 dataset of 13 moving-square episodes; returns (root, actions per episode)."""
    root = tmp_path_factory.mktemp("squares") / "dataset"
    rng = np.random.default_rng(0)
    all_actions = []
    names = {"action": ACTION_NAMES}
    with LeRobotDatasetWriter(root, fps=FPS, crf=0, pix_fmt="yuv444p", feature_names=names) as writer:
        for _ in range(len(TRAIN_EPISODES) + len(HELD_OUT_EPISODES)):
            frames, actions = moving_square_episode(rng)
            writer.add_episode({"observation.images.top": frames}, task="move the square", action=actions)
            all_actions.append(actions)
    return root, all_actions


def pairs_of(root, episodes, **kwargs) -> FramePairDataset:
    return FramePairDataset(load_lerobot_dataset(root), gap_seconds=GAP_SECONDS, episodes=episodes, **kwargs)


# ------------------------------------------------------------------------------------------- pure helpers
def test_window_mean_actions_of_a_known_sequence():
    actions = np.arange(10, dtype=np.float64).reshape(5, 2)  # a_t = (2t, 2t+1)
    frame_index = np.array([0, 1, 3, 4])
    target_frame_index = np.array([2, 4, 4, 4])  # gap 2; t=3 clamped to the last frame, t=4 is the last pair
    means = window_mean_actions(actions, frame_index, target_frame_index)
    expected = [actions[0:2].mean(0), actions[1:4].mean(0), actions[3:4].mean(0), actions[4]]
    np.testing.assert_allclose(means, expected)
    with pytest.raises(ValueError, match="outside"):
        window_mean_actions(actions, np.array([4]), np.array([6]))


def test_r2_matches_its_definition_and_is_null_for_a_constant_target():
    rng = np.random.default_rng(0)
    truth, prediction = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
    expected = 1 - ((truth - prediction) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(r2_per_dimension(truth, prediction), expected)
    constant = np.ones((10, 1))
    assert np.isnan(r2_per_dimension(constant, constant + 0.1)[0])


def test_probes_recover_a_linear_target_and_find_nothing_in_noise():
    rng = np.random.default_rng(0)
    num_fit, num_test, dim = 400, 200, 12
    x = rng.normal(size=(num_fit + num_test, dim))
    groups = np.repeat(np.arange(20), num_fit // 20)
    linear = x @ rng.normal(size=(dim, 2)) + 3.0
    noise = rng.normal(size=(num_fit + num_test, 1))
    nonlinear = np.abs(x[:, :1]) * 2.0  # no linear signal at all
    targets = np.concatenate([linear, noise, nonlinear], axis=1)
    fit, test = slice(0, num_fit), slice(num_fit, None)

    ridge = RidgeProbe().fit(x[fit], targets[fit], groups, seed=0)
    ridge_r2 = r2_per_dimension(targets[test], ridge.predict(x[test]))
    assert (ridge_r2[:2] > 0.999).all(), ridge_r2
    assert abs(ridge_r2[2]) < 0.1 and ridge_r2[3] < 0.1, ridge_r2
    assert ridge.alpha_[2] >= ridge.alpha_[0]  # noise pushes the validation choice to a stronger penalty

    mlp = MLPProbe().fit(x[fit], targets[fit], groups, seed=0)
    mlp_r2 = r2_per_dimension(targets[test], mlp.predict(x[test]))
    assert (mlp_r2[:2] > 0.9).all() and mlp_r2[2] < 0.1, mlp_r2
    assert mlp_r2[3] > 0.6, mlp_r2  # the non-linear probe sees what the linear one cannot
    again = MLPProbe().fit(x[fit], targets[fit], groups, seed=0).predict(x[test])
    np.testing.assert_array_equal(again, mlp.predict(x[test]))  # seeded


def test_latent_probes_are_compared_with_the_leakage_baseline_per_position_dimension():
    """Features that carry dims 0 and 1 of the action, against frame-t features that carry dim 1 better and dim 0
    not at all: the latents beat the baseline on dim 0 only; dim 2 (the gripper) is not a position dimension."""
    rng = np.random.default_rng(0)
    episodes = np.repeat(np.arange(30), 10)
    targets = rng.normal(size=(300, 3))
    noise = lambda scale, dim: scale * rng.normal(size=(300, dim))  # noqa: E731
    features = {
        "latents": np.concatenate([targets[:, :2] + noise(0.3, 2), noise(1.0, 6)], axis=1),
        "codes_one_hot": np.eye(4)[rng.integers(0, 4, size=300)],
        "frame_t_pixels": np.concatenate([targets[:, 1:2] + noise(0.05, 1), noise(1.0, 8)], axis=1),
    }
    fit, test = episodes < 20, episodes >= 20
    result = run_probes({k: v[fit] for k, v in features.items()}, targets[fit], episodes[fit],
                        {k: v[test] for k, v in features.items()}, targets[test], ACTION_NAMES, [0, 1], seed=0)
    assert result["latent_probe_beats_leakage"] == {"delta_x": True, "delta_y": False}
    assert result["best_latent_r2"]["delta_x"] > 0.8 and result["best_leakage_r2"]["delta_x"] < 0.1
    assert result["best_leakage_r2"]["delta_y"] > 0.95
    assert result["r2"]["latents"]["linear"]["gripper"] < 0.1
    assert set(result["r2"]) == {"latents", "codes_one_hot", "frame_t_pixels"}


def test_codebook_metrics_match_direct_counts():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(300, 3))
    codes[:, 2] = np.where(rng.random(300) < 0.99, 0, codes[:, 2])  # slot 2 nearly collapsed
    metrics = codebook_metrics(codes, 5)  # code 4 is never used
    usage = np.array(metrics["usage"])
    assert usage.shape == (3, 5)
    np.testing.assert_allclose(usage.sum(axis=1), 1.0)
    np.testing.assert_allclose(usage[1], np.bincount(codes[:, 1], minlength=5) / 300)
    assert metrics["num_distinct_latent_actions"] == len({tuple(row) for row in codes.tolist()})
    assert metrics["num_possible_latent_actions"] == 125
    assert metrics["min_code_fraction"] == 0.0
    assert {(slot, code) for slot, code, _ in metrics["codes_below_threshold"]} >= {(0, 4), (1, 4), (2, 1), (2, 4)}
    uniform = codebook_metrics(np.arange(8).reshape(8, 1), 8)
    assert uniform["perplexity"] == pytest.approx(8.0) and uniform["perplexity_per_slot"] == [pytest.approx(8.0)]
    top = metrics["most_frequent_latent_actions"][0]
    assert top["fraction"] == pytest.approx(max(np.unique(codes, axis=0, return_counts=True)[1]) / 300)


def test_codebook_plot_of_a_long_code_sequence_is_a_heat_map(tmp_path):
    codes = np.random.default_rng(0).integers(0, 8, size=(200, 64))  # s = 64: bar charts would not fit
    metrics = codebook_metrics(codes, 8)
    assert metrics["num_possible_latent_actions"] == float(8**64)  # too big for JSON integers: a float
    path = plot_codebook_usage(metrics, tmp_path / "usage.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


# -------------------------------------------------------------------------------- the evaluation, end to end
def test_evaluation_matches_direct_computation_and_writes_json_and_plots(square_dataset, tmp_path):
    root, _ = square_dataset
    torch.manual_seed(0)
    model = LAPAQuantizerModel(tiny_config()).train()  # untrained: the numbers must still be right
    held_out = pairs_of(root, HELD_OUT_EPISODES)
    rng_state = torch.get_rng_state()

    metrics = evaluate_quantizer(model, held_out, output_dir=tmp_path / "eval", step=7, batch_size=16)

    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng_state)  # the training run's random stream is untouched
    items = [held_out[i] for i in range(len(held_out))]
    pixels = torch.stack([item["pixel_values"] for item in items])
    model.eval()
    with torch.no_grad():
        codes = model.encode(pixels).codes
        prediction = model.decode(pixels[:, 0], codes).clamp(0, 1)
    model.train()
    copy_mse = (pixels[:, 1] - pixels[:, 0]).square().mean(dim=(1, 2, 3))
    prediction_mse = (prediction - pixels[:, 1]).square().mean(dim=(1, 2, 3))
    recon = metrics["reconstruction"]
    assert metrics["num_pairs"] == len(held_out) == len(HELD_OUT_EPISODES) * NUM_FRAMES
    assert recon["copy_mse"] == pytest.approx(copy_mse.mean().item(), rel=1e-5)
    assert recon["prediction_mse"] == pytest.approx(prediction_mse.mean().item(), rel=1e-4)
    assert recon["copy_psnr_of_mean_mse"] == pytest.approx(10 * np.log10(1 / copy_mse.mean().item()), rel=1e-5)
    expected_per_pair = (10 * torch.log10(1 / copy_mse.clamp_min(1e-10))).mean().item()
    assert recon["copy_psnr_mean_per_pair"] == pytest.approx(expected_per_pair, rel=1e-4)

    codebook = metrics["codebook"]
    usage = np.array(codebook["usage"])
    np.testing.assert_allclose(usage.sum(axis=1), 1.0)
    np.testing.assert_allclose(usage, codebook_metrics(codes.numpy(), 4)["usage"])
    assert codebook["num_distinct_latent_actions"] == len({tuple(c) for c in codes.tolist()})
    summary = metrics["summary"]
    assert summary["min_code_fraction"] == usage.min()
    assert summary["all_codes_used_2pct"] == bool(usage.min() >= 0.02)
    assert summary["psnr_above_copy"] == (recon["prediction_mse"] < recon["copy_mse"])

    probes = metrics["probes"]
    assert probes["available"] and probes["action_names"] == ACTION_NAMES
    assert probes["position_names"] == ["delta_x", "delta_y"]  # the gripper is not a position dimension
    assert "split" in probes["fit_on"] and probes["num_fit_pairs"] + probes["num_test_pairs"] == len(held_out)
    assert set(probes["fit_episodes"]).isdisjoint(probes["test_episodes"])
    assert set(probes["r2"]) == {"latents", "codes_one_hot", "frame_t_pixels"}
    assert set(summary["latent_probe_beats_leakage"]) == {"delta_x", "delta_y"}

    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics)) and written["step"] == 7
    assert set(metrics["plots"]) == {"codebook_usage", "action_scatter", "reconstructions", "latent_explorer"}
    for path in metrics["plots"].values():
        data = open(path, "rb").read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path
    flat = scalar_metrics(metrics)
    assert flat["eval/summary/psnr_above_copy"] in (0.0, 1.0) and "eval/reconstruction/copy_mse" in flat


def test_window_mean_targets_come_from_the_parquet_actions(square_dataset):
    """The probe target of each pair is the mean of the written actions over the frames the pair spans, also
    through a Subset and with uint8 pixels (which give the same metrics as float ones)."""
    root, episode_actions = square_dataset
    model = LAPAQuantizerModel(tiny_config()).eval()
    held_out = pairs_of(root, HELD_OUT_EPISODES, output="uint8")
    subset = torch.utils.data.Subset(held_out, list(range(5, 40)))
    encoded = encode_pairs(model, subset, choose_rows(len(subset), None, 0), batch_size=8)
    targets = action_targets(subset, encoded, "window_mean")
    for row in range(len(encoded)):
        episode, t = int(encoded.episode_index[row]), int(encoded.frame_index[row])
        stop = min(t + 2, NUM_FRAMES - 1)
        window = episode_actions[episode][t : max(stop, t + 1)]
        np.testing.assert_allclose(targets[row], window.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(action_targets(subset, encoded, "current"), encoded.action_at_t)

    as_float = encode_pairs(model, pairs_of(root, HELD_OUT_EPISODES), np.arange(5, 40), batch_size=8)
    np.testing.assert_allclose(encoded.copy_mse, as_float.copy_mse, rtol=1e-6)
    np.testing.assert_allclose(encoded.latents, as_float.latents, rtol=1e-4, atol=1e-5)


def test_video_folder_without_actions_skips_the_probes(tmp_path):
    rng = np.random.default_rng(1)
    labels = {}
    for i in range(2):
        frames, _ = moving_square_episode(rng)
        encode_video(tmp_path / "videos" / f"clip{i}.mp4", frames, fps=FPS, crf=0, pix_fmt="yuv444p")
        labels[f"clip{i}"] = "a square moves"
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    pairs = FramePairDataset(VideoFolderDataset(tmp_path / "videos", tmp_path / "labels.json"), gap_seconds=GAP_SECONDS)
    model = LAPAQuantizerModel(tiny_config())
    metrics = evaluate_quantizer(model, pairs, output_dir=tmp_path / "eval", max_pairs=20, make_plots=False)
    assert metrics["num_pairs"] == 20
    assert metrics["probes"]["available"] is False
    assert "no ground-truth actions" in metrics["probes"]["note"] and "skipped" in metrics["summary"]["probes_note"]
    assert metrics["summary"]["latent_probe_beats_leakage"] is None
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["probes"]["available"] is False


def test_bad_arguments_raise_clear_errors(square_dataset):
    root, _ = square_dataset
    model = LAPAQuantizerModel(tiny_config())
    pairs = pairs_of(root, HELD_OUT_EPISODES)
    with pytest.raises(ValueError, match="action_target"):
        evaluate_quantizer(model, pairs, action_target="future")
    with pytest.raises(TypeError, match="unwrap_model"):
        evaluate_quantizer(torch.nn.Linear(2, 2), pairs)
    plain_items = [pairs[i] for i in range(8)]  # a list of items: no source to read the later actions from
    with pytest.raises(ValueError, match="window_mean"):
        evaluate_quantizer(model, plain_items, make_plots=False)
    current = evaluate_quantizer(model, plain_items, action_target="current", make_plots=False)
    assert current["probes"]["available"] is False and "fewer than 2" in current["probes"]["note"]

"""The VPT baseline's inverse dynamics model: it learns actions from frame pairs, pseudo-labels a dataset whose
other columns and videos are kept, and saves/loads strictly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from training.data import LeRobotDatasetWriter, load_lerobot_dataset
from training.inverse_dynamics import (
    IDMConfig, IDMTrainingConfig, InverseDynamicsModel, PSEUDO_ACTIONS_INFO_KEY, pseudo_label_dataset, train_idm,
)

SIZE, FPS = 32, 10


def _square_episode(rng, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A white square moving with a constant velocity per episode; the action is that velocity (pixels per frame)."""
    velocity = rng.uniform(-1.5, 1.5, size=2)
    position = rng.uniform(10, 22, size=2)
    frames = np.zeros((length, SIZE, SIZE, 3), np.uint8)
    for t in range(length):
        y, x = np.clip(position + velocity * t, 2, SIZE - 8).astype(int)
        frames[t, y:y + 6, x:x + 6] = 255
    actions = np.tile(velocity.astype(np.float32), (length, 1))
    return frames, actions


@pytest.fixture(scope="module")
def square_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("idm") / "squares"
    rng = np.random.default_rng(0)
    with LeRobotDatasetWriter(root, fps=FPS, robot_type="fixture") as writer:
        for episode in range(14):
            frames, actions = _square_episode(rng, 12)
            writer.add_episode({"observation.images.top": frames}, task="move the square", action=actions,
                               state=np.zeros((12, 2), np.float32))
    return root


@pytest.mark.slow
def test_the_idm_learns_actions_from_frame_pairs_and_pseudo_labels_a_dataset(square_dataset, tmp_path):
    config = IDMTrainingConfig(dataset=str(square_dataset), episodes=list(range(10)), heldout_episodes=[10, 11, 12, 13],
                               output_dir=str(tmp_path / "idm"), width=8, hidden_size=32, image_size=SIZE,
                               gap_seconds=0.2, learning_rate=3e-3, batch_size=16, max_steps=150)
    model = train_idm(config)
    metrics = json.loads((tmp_path / "idm" / "idm_metrics.json").read_text())
    # held-out episodes: well below predicting the training mean
    assert np.mean(metrics["heldout_l1_per_dim"]) < 0.6 * np.mean(metrics["heldout_mean_baseline_l1_per_dim"])

    reloaded = InverseDynamicsModel.from_pretrained(tmp_path / "idm" / "model")
    pixels = torch.rand(3, 2, 3, SIZE, SIZE)
    torch.testing.assert_close(reloaded.predict(pixels), model.predict(pixels))
    assert train_idm(config).state_dict().keys() == model.state_dict().keys()  # a finished run is reused

    record = pseudo_label_dataset(model, square_dataset, tmp_path / "pseudo", record={"method": "vpt"})
    source, pseudo = load_lerobot_dataset(square_dataset), load_lerobot_dataset(tmp_path / "pseudo")
    assert record["method"] == "vpt" and record["frames"] == 14 * 12
    assert pseudo.meta.info[PSEUDO_ACTIONS_INFO_KEY]["l1_to_true_actions_per_dim"] == record["l1_to_true_actions_per_dim"]
    for episode in (0, 12):
        new, true = pseudo.episode_actions(episode), source.episode_actions(episode)
        assert new.shape == true.shape and not np.array_equal(new, true)
        np.testing.assert_array_equal(pseudo.episode_column(episode, "observation.state"),
                                      source.episode_column(episode, "observation.state"))
        np.testing.assert_array_equal(pseudo.decode_episode(episode, "observation.images.top"),
                                      source.decode_episode(episode, "observation.images.top"))
    all_new = np.concatenate([pseudo.episode_actions(e) for e in range(14)])
    np.testing.assert_allclose(pseudo.meta.stats["action"]["mean"], all_new.mean(0), rtol=1e-5, atol=1e-6)


def test_an_interrupted_idm_run_resumes_to_the_same_model(square_dataset, tmp_path):
    """A run killed after a checkpoint continues from it: same weights as one uninterrupted run, bit for bit."""
    def config(folder, **kw):
        return IDMTrainingConfig(dataset=str(square_dataset), episodes=list(range(10)), output_dir=str(folder), width=8,
                                 hidden_size=32, image_size=SIZE, gap_seconds=0.2, learning_rate=3e-3, batch_size=16,
                                 max_steps=12, save_every=5, **kw)
    whole = train_idm(config(tmp_path / "whole"))
    assert [p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()] == ["step-0000010"]  # the latest kept

    # what a run killed between steps 10 and 12 leaves: its checkpoints and no model
    shutil.copytree(tmp_path / "whole" / "checkpoints", tmp_path / "killed" / "checkpoints")
    resumed = train_idm(config(tmp_path / "killed"))
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)
    assert json.loads((tmp_path / "killed" / "idm_metrics.json").read_text())["steps"] == 12

    shutil.copytree(tmp_path / "whole" / "checkpoints", tmp_path / "other" / "checkpoints")
    with pytest.raises(ValueError, match="other settings"):
        train_idm(config(tmp_path / "other", seed=1))


def test_bad_input_is_refused(square_dataset, tmp_path):
    with pytest.raises(ValueError, match="frame pairs"):
        InverseDynamicsModel(IDMConfig(width=8))(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="save_every"):
        train_idm(IDMTrainingConfig(dataset=str(square_dataset), episodes=[0], save_every=0, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="labelled episodes"):
        train_idm(IDMTrainingConfig(dataset=str(square_dataset), output_dir=str(tmp_path / "x")))
    with pytest.raises(FileNotFoundError, match="no inverse dynamics model"):
        InverseDynamicsModel.from_pretrained(tmp_path)

"""Labelling's encoding (issue 15): what can be shared between the pairs of a video, and the new `encode_episode`
giving the old path's codes (`benchmarks/quantizer_baseline.py`) on a real encoded video episode."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.quantizer_baseline import reference_encode_episode, reference_latents
from data_fixtures import synthetic_frames
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel
from training.data import FramePairDataset, LeRobotDatasetWriter, load_lerobot_dataset
from training.label_latents import main as label_main
from training.labelling import EncodingThreads, encode_episode, pair_targets

GAP = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(seed=3):
    torch.manual_seed(seed)
    config = LAPAQuantizerConfig(hidden_size=32, quant_dim=8, codebook_size=8, code_seq_len=4, image_size=32,
                                 patch_size=4, spatial_depth=2, temporal_depth=2, num_heads=2, head_dim=16)
    return LAPAQuantizerModel(config).eval()


def spatial_outputs(model, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The encoder's spatial stack on the pair (first, second): (2, h*w, D), frame t then frame t+H."""
    tokens = model.patch_embedding(torch.stack([first, second]))  # (2, h, w, D)
    h, w, d = tokens.shape[1:]
    bias = model.spatial_position_bias(h, w)
    return model.encoder_spatial(tokens.reshape(2, h * w, d), video_shape=(1, 2, h, w), position_bias=bias)


@torch.no_grad()
def test_only_the_first_frames_spatial_encoding_is_independent_of_its_pair():
    """Why labelling cannot encode each frame once for the two pairs it is in: the spatial stack's position
    generators are causal in time over the pair, so frame t+H's encoding changes with frame t; frame t's does not
    change with frame t+H (and each frame is the first frame of one pair only)."""
    model = small_model()
    frames = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = spatial_outputs(model, frames[0], frames[1])
    other_first = spatial_outputs(model, frames[2], frames[1])
    other_second = spatial_outputs(model, frames[0], frames[2])
    assert (other_first[1] - base[1]).abs().max() > 1e-3  # frame t+H's encoding depends on frame t
    assert torch.equal(other_second[0], base[0])  # frame t's encoding does not depend on frame t+H
    # the patch embedding is per frame: the same tokens whichever pair the frame is in
    assert torch.equal(model.patch_embedding(frames[1:2]), model.patch_embedding(frames[[0, 1]])[1:2])


def test_encode_frame_pairs_is_encode_of_the_stacked_pairs_bit_for_bit():
    model = small_model()
    with torch.inference_mode():
        _check_encode_frame_pairs(model)
    with torch.inference_mode():
        _check_encode_frame_pairs(small_model())  # a model made under inference_mode (no cached position bias)


def _check_encode_frame_pairs(model):
    frames = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first, second = torch.arange(7), torch.from_numpy(pair_targets(9, GAP))[:7]
    stacked = torch.stack([frames[first], frames[second]], dim=1)
    shared = model.encode_frame_pairs(frames, first, second)
    encoded = model.encode(stacked)
    assert torch.equal(shared.latents, encoded.latents) and torch.equal(shared.codes, encoded.codes)
    assert torch.equal(shared.latents.flatten(0, 1), reference_latents(model, stacked))
    with pytest.raises(ValueError, match="first_index"):
        model.encode_frame_pairs(frames, first, second[:3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode_frame_pairs(frames * 2, first, second)


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory):
    """Two episodes written as H.264 video by the dataset writer."""
    root = tmp_path_factory.mktemp("label_encoding") / "source"
    with LeRobotDatasetWriter(root, fps=10, robot_type="fixture_arm") as writer:
        for episode, length in enumerate((23, 9)):
            writer.add_episode({"observation.images.top": synthetic_frames(length, seed=episode, height=40, width=48)},
                               task="push", action=np.zeros((length, 2)))
    return root


@pytest.fixture(scope="module")
def video_episodes(video_dataset):
    """The episodes decoded back at the quantizer's size, as the labeller decodes them."""
    pairs = FramePairDataset(load_lerobot_dataset(video_dataset), gap_seconds=0.3, image_size=32, output="uint8")
    return [pairs.decode_episode(episode) for episode in pairs.episode_indices]


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_new_encode_episode_gives_the_old_paths_codes_on_a_real_video(video_episodes, batch_size):
    model = small_model()
    codes_seen = set()
    for frames in video_episodes:
        assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 32, 3)
        old = reference_encode_episode(model, frames, GAP, batch_size)
        new = encode_episode(model, frames, GAP, batch_size)
        with EncodingThreads(3) as threads:
            threaded = encode_episode(model, frames, GAP, batch_size, threads=threads)
        assert torch.get_num_threads() == 1  # the intra-op threads are put back
        assert new.shape == (len(frames), 4) and new.dtype == np.int64
        np.testing.assert_array_equal(new, old)
        np.testing.assert_array_equal(threaded, old)
        codes_seen.update(map(tuple, new.tolist()))
    assert len(codes_seen) > 3  # a model whose codes vary over these frames


@pytest.mark.parametrize("encode_threads", ["0", "2"])
def test_the_labeller_writes_the_old_paths_codes(video_dataset, video_episodes, tmp_path, encode_threads):
    model = small_model()
    model.config.gap_seconds = 0.3
    model.save_pretrained(tmp_path / "quantizer")
    output = tmp_path / "labelled"
    assert label_main(["--dataset", str(video_dataset), "--quantizer", str(tmp_path / "quantizer"), "--output",
                       str(output), "--batch-size", "4", "--num-workers", "0", "--encode-threads", encode_threads,
                       "--log-level", "WARNING"]) == 0
    table = pq.read_table(output / "data/chunk-000/file-000.parquet")
    labelled = np.stack(table.column("latent_action").to_pylist())
    expected = np.concatenate([reference_encode_episode(model, frames, GAP, 4) for frames in video_episodes])
    np.testing.assert_array_equal(labelled, expected)
    assert torch.get_num_threads() == 1

"""Frame pairs: gap in seconds -> frames, clamping at episode ends, layout, streaming that covers every pair
exactly once across 2 ranks x 2 DataLoader workers, and exact resumption from a state_dict."""

import numpy as np
import pytest
import torch

from data_fixtures import best_matching_frame, build_v30_dataset, write_with_writer
from training.data import FramePairDataset, gap_in_frames, load_lerobot_dataset, make_streaming_frame_pairs


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    """Our writer's dataset: episodes of 12, 9, 15, 7, 10 frames at 10 fps, two cameras."""
    root = tmp_path_factory.mktemp("pairs")
    truth = write_with_writer(root, lengths=(12, 9, 15, 7, 10), crf=18)
    return load_lerobot_dataset(root), truth


def _all_pairs(pairs):
    return sorted((e, t) for e in pairs.episode_indices for t in range(pairs.num_pairs(e)))


def test_gap_in_frames():
    assert gap_in_frames(0.6, 10) == 6 and gap_in_frames(0.6, 30) == 18 and gap_in_frames(0.6, 12) == 7
    assert gap_in_frames(0.01, 10) == 1  # at least one frame


def test_pairs_clamp_at_episode_end_like_the_reference(robot):
    dataset, truth = robot
    pairs = FramePairDataset(dataset, gap_seconds=0.6)  # 6 frames at 10 fps
    assert len(pairs) == sum(truth["lengths"])  # every frame starts a pair
    assert pairs.camera_key == "observation.images.top"  # default: the first camera
    assert pairs.locate(0) == (0, 0, 6)
    assert pairs.locate(5) == (0, 5, 11)
    assert pairs.locate(6) == (0, 6, 11)  # clamped to the last frame of episode 0
    assert pairs.locate(11) == (0, 11, 11)
    assert pairs.locate(12) == (1, 0, 6)
    dropping = FramePairDataset(dataset, gap_seconds=0.6, drop_crossing=True)
    assert len(dropping) == sum(n - 6 for n in truth["lengths"])
    assert dropping.locate(5) == (0, 5, 11) and dropping.locate(6) == (1, 0, 6)


def test_items_layout_and_content(robot):
    dataset, truth = robot
    pairs = FramePairDataset(dataset, camera_key="wrist", gap_seconds=0.3)
    item = pairs[12 + 7]  # episode 1, t = 7 -> target 8 (clamped from 10)
    assert item["pixel_values"].shape == (2, 3, 32, 48) and item["pixel_values"].dtype == torch.float32
    assert 0.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert (item["episode_index"], item["frame_index"], item["target_frame_index"]) == (1, 7, 8)
    assert item["index"] == 12 + 7 and item["task"] == truth["tasks"][1]
    np.testing.assert_array_equal(item["action"].numpy(), truth["action"][1][7])
    originals = truth["frames"][1]["observation.images.wrist"]
    images = (item["pixel_values"] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert [best_matching_frame(image, originals) for image in images] == [7, 8]

    square = FramePairDataset(dataset, gap_seconds=0.3, image_size=16, output="uint8")
    square_item = square[3]
    assert square_item["pixel_values"].shape == (2, 3, 16, 16) and square_item["pixel_values"].dtype == torch.uint8
    seek = FramePairDataset(dataset, gap_seconds=0.3, image_size=16, output="uint8", frame_access="seek")
    for idx in (3, 20, 40, 0):  # random access by seeking gives the same pixels as episode decoding
        torch.testing.assert_close(seek[idx]["pixel_values"], square[idx]["pixel_values"])


def test_pairs_of_a_hand_built_v30_dataset_without_our_writer(tmp_path):
    truth = build_v30_dataset(tmp_path, lengths=(8, 6, 9))
    pairs = FramePairDataset(load_lerobot_dataset(tmp_path), gap_seconds=0.2, episodes=[1, 2])
    assert pairs.episode_indices == [1, 2] and len(pairs) == 15
    item = pairs[6 + 8]
    assert (item["episode_index"], item["frame_index"], item["target_frame_index"]) == (2, 8, 8)
    images = (item["pixel_values"] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    originals = truth["frames"][2]["observation.images.top"]
    assert [best_matching_frame(image, originals) for image in images] == [8, 8]


def test_streaming_single_process_covers_every_pair_once(robot):
    dataset, _ = robot
    pairs = FramePairDataset(dataset, gap_seconds=0.3, image_size=16)
    stream = make_streaming_frame_pairs(pairs, seed=1)
    items = list(stream)
    assert sorted((it["episode_index"], it["frame_index"]) for it in items) == _all_pairs(pairs)
    assert items[0]["pixel_values"].shape == (2, 3, 16, 16) and items[0]["pixel_values"].dtype == torch.float32
    order = [(it["episode_index"], it["frame_index"]) for it in items]
    assert order != sorted(order)  # shuffled
    again = [(it["episode_index"], it["frame_index"]) for it in make_streaming_frame_pairs(pairs, seed=1)]
    assert again == order  # reproducible from the seed
    stream.set_epoch(1)
    assert [(it["episode_index"], it["frame_index"]) for it in stream] != order
    ordered = [(it["episode_index"], it["frame_index"]) for it in make_streaming_frame_pairs(pairs, shuffle=False)]
    assert ordered == sorted(ordered)
    # streaming pixels are the map-style pixels
    first = items[0]
    position = pairs.episode_indices.index(first["episode_index"])
    torch.testing.assert_close(first["pixel_values"], pairs[int(pairs._offsets[position]) + first["frame_index"]]["pixel_values"])


@pytest.mark.parametrize("episodes", [[0, 1, 2, 3], [0, 1, 2, 3, 4]], ids=["shards-divisible", "shards-not-divisible"])
def test_two_ranks_two_workers_read_every_pair_exactly_once(robot, episodes):
    dataset, _ = robot
    pairs = FramePairDataset(dataset, gap_seconds=0.3, image_size=16, output="uint8", episodes=episodes)
    seen = []
    for rank in range(2):
        stream = make_streaming_frame_pairs(pairs, seed=0, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
        for batch in loader:
            assert batch["pixel_values"].shape[1:] == (2, 3, 16, 16)
            seen.extend(zip(batch["episode_index"].tolist(), batch["frame_index"].tolist()))
    assert len(seen) == len(pairs)
    assert sorted(seen) == _all_pairs(pairs)


@pytest.mark.parametrize("stop_after", [1, 13, 30, 52])
def test_resume_from_state_dict_continues_exactly(robot, stop_after):
    dataset, _ = robot
    pairs = FramePairDataset(dataset, gap_seconds=0.3, image_size=8, output="uint8")
    full = [(it["episode_index"], it["frame_index"]) for it in make_streaming_frame_pairs(pairs, seed=3)]
    stream = make_streaming_frame_pairs(pairs, seed=3)
    iterator = iter(stream)
    first = [(it["episode_index"], it["frame_index"]) for it in (next(iterator) for _ in range(stop_after))]
    state = stream.state_dict()
    resumed = make_streaming_frame_pairs(pairs, seed=3)
    resumed.load_state_dict(state)
    rest = [(it["episode_index"], it["frame_index"]) for it in resumed]
    assert first + rest == full


def test_resume_on_one_rank_with_float_output(robot):
    dataset, _ = robot
    pairs = FramePairDataset(dataset, gap_seconds=0.3, image_size=8)  # float: converted by a datasets .map
    full = [it["index"] for it in make_streaming_frame_pairs(pairs, rank=1, world_size=2)]
    stream = make_streaming_frame_pairs(pairs, rank=1, world_size=2)
    iterator = iter(stream)
    first = [next(iterator)["index"] for _ in range(10)]
    resumed = make_streaming_frame_pairs(pairs, rank=1, world_size=2)
    resumed.load_state_dict(stream.state_dict())
    assert first + [it["index"] for it in resumed] == full


def test_shuffle_buffer_resume_never_repeats_a_pair(robot):
    """datasets keeps no shuffle-buffer content in state_dict: after a resume the buffered pairs are not
    seen again in that epoch, and none is seen twice (documented in make_streaming_frame_pairs)."""
    dataset, _ = robot
    pairs = FramePairDataset(dataset, gap_seconds=0.3, image_size=8, output="uint8")
    stream = make_streaming_frame_pairs(pairs, seed=0, shuffle_buffer_size=8)
    iterator = iter(stream)
    first = [next(iterator)["index"] for _ in range(20)]
    resumed = make_streaming_frame_pairs(pairs, seed=0, shuffle_buffer_size=8)
    resumed.load_state_dict(stream.state_dict())
    rest = [it["index"] for it in resumed]
    assert not set(first) & set(rest) and len(set(first + rest)) == len(first + rest)
    assert len(pairs) - 8 <= len(first) + len(rest) <= len(pairs)

"""VLA frames: items equal to the source (parquet codes/actions, decoded frames), unlabelled episodes left out,
clear errors for missing columns, frame_stride, streaming that serves every frame exactly once across 2 ranks x 2
DataLoader workers, exact resumption from a state_dict, and batching with collate_vla_frames.

The labelled dataset is written by our writer with a hand-made `latent_action` column, laid out as
`training/label_latents.py` writes it (int64, s codes per frame, -1 in every slot of an unlabelled episode's rows).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_fixtures import TASKS, best_matching_frame, synthetic_frames, write_with_writer
from training.data import (
    LATENT_ACTION_KEY,
    UNLABELLED_CODE,
    LeRobotDatasetWriter,
    VLAFrameDataset,
    collate_vla_frames,
    load_lerobot_dataset,
    make_streaming_vla_frames,
)

LENGTHS = (12, 9, 15, 7, 10)
UNLABELLED_EPISODE = 2  # labelling "failed" on it: every slot of its rows is UNLABELLED_CODE
CODE_SEQ_LEN, CODEBOOK_SIZE = 4, 8
CAMERA = "observation.images.top"


def _write_labelled(root: Path, lengths=LENGTHS, *, with_actions: bool = True, unlabelled=(UNLABELLED_EPISODE,)):
    rng = np.random.default_rng(11)
    with LeRobotDatasetWriter(root, fps=10, robot_type="fixture_arm", crf=18) as writer:
        for episode, length in enumerate(lengths):
            codes = rng.integers(0, CODEBOOK_SIZE, size=(length, CODE_SEQ_LEN), dtype=np.int64)
            if episode in unlabelled:
                codes[:] = UNLABELLED_CODE
            frames = {CAMERA: synthetic_frames(length, seed=episode),
                      "observation.images.wrist": synthetic_frames(length, seed=episode + 20)}
            writer.add_episode(
                frames, task=TASKS[episode % 2], state=rng.normal(size=(length, 4)),
                action=rng.normal(size=(length, 3)) if with_actions else None,
                extra_frame_columns={LATENT_ACTION_KEY: codes},
            )


def _parquet_rows(root: Path) -> dict[tuple[int, int], dict]:
    """{(episode, frame): row} read straight from the data parquet files, without our reader."""
    table = pa.concat_tables([pq.read_table(path) for path in sorted((root / "data").glob("*/*.parquet"))])
    rows = table.to_pylist()
    return {(row["episode_index"], row["frame_index"]): row for row in rows}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("vla_labelled")
    _write_labelled(root)
    return load_lerobot_dataset(root), _parquet_rows(root)


def _keys(items) -> list[tuple[int, int]]:
    return [(int(it["episode_index"]), int(it["frame_index"])) for it in items]


def _all_keys(frames: VLAFrameDataset) -> list[tuple[int, int]]:
    return sorted((e, int(t)) for e in frames.episode_indices for t in frames.frame_indices(e))


def test_latent_items_match_the_parquet_and_the_decoded_frames(labelled):
    dataset, rows = labelled
    frames = VLAFrameDataset(dataset, target="latent", image_size=16)
    assert frames.camera_key == CAMERA and frames.latent_sequence_length == CODE_SEQ_LEN and frames.action_dim == 3
    decoded = {e: dataset.decode_episode(e, CAMERA, size=16) for e in frames.episode_indices}
    for idx in (0, 11, 12, 20, 21, len(frames) - 1):
        item = frames[idx]
        episode, t = item["episode_index"], item["frame_index"]
        assert (episode, t) == frames.locate(idx)
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (16, 16, 3)
        np.testing.assert_array_equal(item["image"].numpy(), decoded[episode][t])
        assert item["latent_codes"].dtype == torch.int64 and item["latent_codes"].shape == (CODE_SEQ_LEN,)
        assert item["latent_codes"].tolist() == rows[(episode, t)][LATENT_ACTION_KEY]
        assert item["instruction"] == TASKS[episode % 2]
        assert "action" not in item
    assert frames.locate(12) == (1, 0) and frames.locate(21) == (3, 0)  # episode 2 is unlabelled

    full = VLAFrameDataset(dataset, target="latent", camera_key="wrist")  # full size: the frame is recognisable
    item = full[12 + 5]
    assert item["image"].shape == (32, 48, 3) and (item["episode_index"], item["frame_index"]) == (1, 5)
    assert best_matching_frame(item["image"].numpy(), synthetic_frames(9, seed=1 + 20)) == 5
    assert frames.instructions == sorted(TASKS)


def test_unlabelled_frames_are_left_out_and_logged_once(labelled, caplog):
    dataset, rows = labelled
    with caplog.at_level(logging.WARNING, logger="training.data.vla_frames"):
        frames = VLAFrameDataset(dataset, target="latent")
    warnings = [r for r in caplog.records if "UNLABELLED" in r.getMessage()]
    assert len(warnings) == 1
    assert frames.episode_indices == [0, 1, 3, 4] and frames.unlabelled_episodes == [UNLABELLED_EPISODE]
    assert frames.num_unlabelled_frames == LENGTHS[UNLABELLED_EPISODE]
    assert len(frames) == sum(LENGTHS) - LENGTHS[UNLABELLED_EPISODE]
    codes = frames.all_latent_codes()
    assert codes.shape == (len(frames), CODE_SEQ_LEN) and codes.dtype == np.int64
    assert (codes >= 0).all() and (codes < CODEBOOK_SIZE).all()
    expected = [rows[key][LATENT_ACTION_KEY] for key in _all_keys(frames)]
    np.testing.assert_array_equal(codes, np.array(expected))
    # The action target does not need labels: the unlabelled episode is served.
    actions = VLAFrameDataset(dataset, target="action")
    assert actions.episode_indices == [0, 1, 2, 3, 4] and actions.num_unlabelled_frames == 0


def test_action_items_and_all_actions_equal_the_parquet(labelled):
    dataset, rows = labelled
    chosen = [0, 2, 4]
    frames = VLAFrameDataset(dataset, target="action", episodes=chosen, image_size=8)
    assert frames.episode_indices == chosen and len(frames) == sum(LENGTHS[e] for e in chosen)
    item = frames[12 + 3]  # episode 2, t = 3
    assert (item["episode_index"], item["frame_index"]) == (2, 3) and "latent_codes" not in item
    assert item["action"].dtype == torch.float32 and item["action"].shape == (3,)
    np.testing.assert_array_equal(item["action"].numpy(), np.float32(rows[(2, 3)]["action"]))
    actions = frames.all_actions()
    assert actions.dtype == np.float32 and actions.shape == (len(frames), 3)
    expected = np.array([rows[(e, t)]["action"] for e in chosen for t in range(LENGTHS[e])], dtype=np.float32)
    np.testing.assert_array_equal(actions, expected)
    assert frames.instructions == sorted({TASKS[0]})  # episodes 0, 2, 4 all have the first task
    with pytest.raises(KeyError, match="not served"):
        VLAFrameDataset(dataset, target="action", episodes=[0, 99])


def test_frame_stride(labelled):
    dataset, rows = labelled
    frames = VLAFrameDataset(dataset, target="latent", frame_stride=3, image_size=8)
    for episode in frames.episode_indices:
        assert frames.frame_indices(episode).tolist() == list(range(0, LENGTHS[episode], 3))
    assert len(frames) == sum(len(range(0, n, 3)) for e, n in enumerate(LENGTHS) if e != UNLABELLED_EPISODE)
    assert frames.num_unlabelled_frames == len(range(0, LENGTHS[UNLABELLED_EPISODE], 3))
    assert frames.locate(4) == (1, 0)  # episode 0 serves frames 0, 3, 6, 9
    assert frames[5]["frame_index"] == 3 and frames[5]["latent_codes"].tolist() == rows[(1, 3)][LATENT_ACTION_KEY]
    expected = [rows[key]["action"] for key in _all_keys(frames)]
    np.testing.assert_array_equal(frames.all_actions(), np.array(expected, dtype=np.float32))
    with pytest.raises(ValueError, match="frame_stride"):
        VLAFrameDataset(dataset, frame_stride=0)


def test_missing_columns_give_clear_errors(tmp_path):
    write_with_writer(tmp_path / "unlabelled", lengths=(4, 3))
    unlabelled = load_lerobot_dataset(tmp_path / "unlabelled")
    with pytest.raises(KeyError, match=r"label_latents\.py"):
        VLAFrameDataset(unlabelled, target="latent")
    assert VLAFrameDataset(unlabelled, target="action").all_actions().shape == (7, 3)
    with pytest.raises(KeyError, match="latent_action"):
        VLAFrameDataset(unlabelled, target="action").all_latent_codes()

    _write_labelled(tmp_path / "no_actions", lengths=(4, 3), with_actions=False, unlabelled=())
    no_actions = load_lerobot_dataset(tmp_path / "no_actions")
    with pytest.raises(KeyError, match="target='action' needs the per-frame column 'action'"):
        VLAFrameDataset(no_actions, target="action")
    latent = VLAFrameDataset(no_actions, target="latent")
    assert len(latent) == 7 and latent.action_dim is None
    with pytest.raises(ValueError, match="target must be"):
        VLAFrameDataset(no_actions, target="codes")


def test_streaming_items_equal_the_map_style_items(labelled):
    dataset, _ = labelled
    frames = VLAFrameDataset(dataset, target="latent", image_size=8)
    stream = make_streaming_vla_frames(frames, seed=1)
    items = list(stream)
    assert sorted(_keys(items)) == _all_keys(frames)
    order = _keys(items)
    assert order != sorted(order)  # shuffled
    assert _keys(make_streaming_vla_frames(frames, seed=1)) == order  # reproducible from the seed
    reshuffled = []
    for epoch in (1, 2):  # the episode order is reshuffled per epoch (with 4 episodes, epoch 1 may repeat epoch 0)
        stream.set_epoch(epoch)
        reshuffled.append(_keys(stream))
    assert any(keys != order for keys in reshuffled) and all(sorted(keys) == sorted(order) for keys in reshuffled)
    assert _keys(make_streaming_vla_frames(frames, shuffle=False)) == _all_keys(frames)
    by_key = {key: i for i, key in enumerate(_all_keys(frames))}  # map-style item order is sorted (episode, t)
    for item in items[:5] + items[-3:]:
        reference = frames[by_key[(item["episode_index"], item["frame_index"])]]
        assert isinstance(item["image"], np.ndarray) and item["image"].dtype == np.uint8
        np.testing.assert_array_equal(item["image"], reference["image"].numpy())
        np.testing.assert_array_equal(item["latent_codes"], reference["latent_codes"].numpy())
        assert item["instruction"] == reference["instruction"]
    # A dataset built with other arguments streams its own frames.
    built = make_streaming_vla_frames(VLAFrameDataset(dataset, target="action", frame_stride=4, image_size=8),
                                      shuffle=False)
    first = next(iter(built))
    assert first["action"].dtype == np.float32 and (first["episode_index"], first["frame_index"]) == (0, 0)
    assert len(list(built)) == sum(len(range(0, n, 4)) for n in LENGTHS)
    with pytest.raises(TypeError, match="target"):  # the stream takes a built dataset, not dataset arguments
        make_streaming_vla_frames(frames, target="action")
    with pytest.raises(TypeError, match="takes a VLAFrameDataset"):
        make_streaming_vla_frames(dataset)


@pytest.mark.parametrize("episodes", [[0, 1, 3, 4], [0, 1, 3]], ids=["shards-divisible", "shards-not-divisible"])
def test_two_ranks_two_workers_read_every_frame_exactly_once(labelled, episodes):
    dataset, rows = labelled
    frames = VLAFrameDataset(dataset, target="latent", image_size=8, episodes=episodes)
    seen = []
    for rank in range(2):
        stream = make_streaming_vla_frames(frames, seed=0, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=collate_vla_frames)
        for batch in loader:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (8, 8, 3)
            keys = list(zip(batch["episode_index"].tolist(), batch["frame_index"].tolist()))
            assert batch["latent_codes"].tolist() == [rows[key][LATENT_ACTION_KEY] for key in keys]
            seen.extend(keys)
    assert len(seen) == len(frames)
    assert sorted(seen) == _all_keys(frames)


@pytest.mark.parametrize("stop_after", [1, 17, 37])  # 38 labelled frames: 37 stops one before the end
def test_resume_from_state_dict_continues_exactly(labelled, stop_after):
    dataset, _ = labelled
    frames = VLAFrameDataset(dataset, target="latent", image_size=8)
    full = _keys(make_streaming_vla_frames(frames, seed=3))
    stream = make_streaming_vla_frames(frames, seed=3)
    iterator = iter(stream)
    first = _keys(next(iterator) for _ in range(stop_after))
    state = stream.state_dict()
    resumed = make_streaming_vla_frames(frames, seed=3)
    resumed.load_state_dict(state)
    assert first + _keys(resumed) == full


def test_resume_on_one_rank_of_two(labelled):
    dataset, _ = labelled
    frames = VLAFrameDataset(dataset, target="action", image_size=8, frame_stride=2)
    full = _keys(make_streaming_vla_frames(frames, rank=1, world_size=2))
    stream = make_streaming_vla_frames(frames, rank=1, world_size=2)
    iterator = iter(stream)
    first = _keys(next(iterator) for _ in range(7))
    resumed = make_streaming_vla_frames(frames, rank=1, world_size=2)
    resumed.load_state_dict(stream.state_dict())
    assert first + _keys(resumed) == full


def test_collate_vla_frames(labelled):
    dataset, rows = labelled
    latent = VLAFrameDataset(dataset, target="latent", image_size=8)
    batch = collate_vla_frames([latent[i] for i in (0, 5, 21)])
    assert batch["image"].shape == (3, 8, 8, 3) and batch["image"].dtype == torch.uint8
    assert batch["latent_codes"].shape == (3, CODE_SEQ_LEN) and batch["latent_codes"].dtype == torch.int64
    assert batch["instruction"] == [latent[i]["instruction"] for i in (0, 5, 21)]
    assert batch["episode_index"].tolist() == [0, 0, 3] and batch["frame_index"].tolist() == [0, 5, 0]
    np.testing.assert_array_equal(batch["image"][1].numpy(), latent[5]["image"].numpy())
    actions_only = VLAFrameDataset(dataset, target="action", image_size=8)
    streamed = list(make_streaming_vla_frames(actions_only, shuffle=False))[:2]
    actions = collate_vla_frames(streamed)  # numpy items from the stream
    assert actions["action"].dtype == torch.float32 and "latent_codes" not in actions
    np.testing.assert_array_equal(actions["action"].numpy(), np.array([rows[(0, 0)]["action"], rows[(0, 1)]["action"]],
                                                                      dtype=np.float32))
    with pytest.raises(ValueError, match="mix targets"):
        collate_vla_frames([latent[0], streamed[0]])
    with pytest.raises(ValueError, match="different sizes"):
        collate_vla_frames([latent[0], VLAFrameDataset(dataset, target="latent")[0]])


def test_action_chunks_are_the_next_k_actions_with_the_last_repeated_at_episode_ends(labelled):
    dataset, rows = labelled
    k = 4
    frames = VLAFrameDataset(dataset, target="action", episodes=[0, 3], image_size=8, action_chunk_size=k,
                             frame_stride=2)
    # episode 3 has 7 frames: served t = 0, 2, 4, 6; the chunk of t = 4 runs 4, 5, 6, 6 and that of t = 6 is 6 x 4.
    items = {(int(it["episode_index"]), int(it["frame_index"])): it for it in (frames[i] for i in range(len(frames)))}
    for t, steps in ((0, [0, 1, 2, 3]), (4, [4, 5, 6, 6]), (6, [6, 6, 6, 6])):
        action = items[(3, t)]["action"]
        assert action.dtype == torch.float32 and action.shape == (k, 3)
        np.testing.assert_array_equal(action.numpy(), np.float32([rows[(3, s)]["action"] for s in steps]))
    # The chunk reads consecutive control steps whatever the stride; all_action_chunks is the items' targets in order.
    np.testing.assert_array_equal(items[(0, 2)]["action"].numpy(), np.float32([rows[(0, s)]["action"]
                                                                              for s in range(2, 6)]))
    chunks = frames.all_action_chunks()
    assert chunks.shape == (len(frames), k, 3)
    np.testing.assert_array_equal(chunks, np.stack([frames[i]["action"].numpy() for i in range(len(frames))]))
    assert frames.all_actions().shape == (len(frames), 3)  # the bins are still fitted on one action per frame
    # The stream shares the targets; the collated batch is (B, k, D).
    streamed = {(int(it["episode_index"]), int(it["frame_index"])): it
                for it in make_streaming_vla_frames(frames, shuffle=False)}
    np.testing.assert_array_equal(streamed[(3, 4)]["action"], items[(3, 4)]["action"].numpy())
    assert collate_vla_frames([items[(3, 4)], items[(3, 6)]])["action"].shape == (2, k, 3)
    # k = 1 is the single-step layout.
    assert VLAFrameDataset(dataset, target="action", episodes=[3], action_chunk_size=1)[0]["action"].shape == (3,)
    with pytest.raises(ValueError, match="needs target='action'"):
        VLAFrameDataset(dataset, target="latent", action_chunk_size=2)
    with pytest.raises(ValueError, match="action_chunk_size must be a positive integer"):
        VLAFrameDataset(dataset, target="action", action_chunk_size=0)

"""Our LeRobot v3.0 writer: a written folder round-trips exactly (every column, meta files, frames within
codec tolerance), chunks files like LeRobot, and rejects bad episodes before touching any file."""

import json

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import TASKS, best_matching_frame, mean_abs_error, synthetic_frames, write_with_writer
from training.data import EmptyEpisodeError, LeRobotDatasetWriter, load_lerobot_dataset
from training.data.stats import QUANTILE_KEYS, QUANTILES


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("written")
    return root, write_with_writer(root, crf=18)


def test_info_json(written):
    root, truth = written
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "fixture_arm"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 36, 2)
    assert info["splits"] == {"train": "0:3"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert list(info["features"]) == [
        "observation.images.top", "observation.images.wrist", "observation.state", "action", "next.reward",
        "timestamp", "frame_index", "episode_index", "index", "task_index",
    ]
    camera = info["features"]["observation.images.top"]
    assert camera["dtype"] == "video" and camera["shape"] == [32, 48, 3]
    assert camera["info"]["video.codec"] == "h264" and camera["info"]["video.g"] == 20
    assert camera["info"]["video.crf"] == 18 and camera["info"]["video.pix_fmt"] == "yuv420p"
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [4], "names": None}
    assert info["features"]["next.reward"]["shape"] == [1]


def test_parquet_columns_roundtrip_exactly(written):
    root, truth = written
    table = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert table.schema.metadata and b"huggingface" in table.schema.metadata  # datasets-readable types
    action_type = table.schema.field("action").type
    assert pa.types.is_fixed_size_list(action_type) and action_type.list_size == 3
    assert action_type.value_type == pa.float32()
    np.testing.assert_array_equal(np.stack(table.column("observation.state").to_pylist()), np.concatenate(truth["state"]))
    np.testing.assert_array_equal(np.stack(table.column("action").to_pylist()), np.concatenate(truth["action"]))
    np.testing.assert_array_equal(table.column("next.reward").to_numpy(), np.concatenate(truth["reward"]))
    lengths = truth["lengths"]
    np.testing.assert_array_equal(table.column("index").to_numpy(), np.arange(36))
    np.testing.assert_array_equal(table.column("episode_index").to_numpy(), np.repeat([0, 1, 2], lengths))
    np.testing.assert_array_equal(table.column("frame_index").to_numpy(), np.concatenate([np.arange(n) for n in lengths]))
    np.testing.assert_allclose(table.column("timestamp").to_numpy(), np.concatenate([np.arange(n) / 10 for n in lengths]), atol=1e-7)
    np.testing.assert_array_equal(table.column("task_index").to_numpy(), np.repeat([0, 1, 0], lengths))
    tasks = pd.read_parquet(root / "meta/tasks.parquet")
    assert list(tasks.index) == TASKS and tasks.index.name == "task" and list(tasks["task_index"]) == [0, 1]


def test_items_and_episode_metadata_roundtrip(written):
    root, truth = written
    dataset = load_lerobot_dataset(root)
    meta = dataset.meta
    assert [ep["success"] for ep in meta.episodes] == truth["success"]
    assert [ep["length"] for ep in meta.episodes] == truth["lengths"]
    assert [ep["tasks"] for ep in meta.episodes] == [[t] for t in truth["tasks"]]
    # All episodes share one mp4 per camera, each in its own time range.
    assert [ep["videos/observation.images.top/from_timestamp"] for ep in meta.episodes] == [0.0, 1.2, 2.1]
    assert [ep["videos/observation.images.top/to_timestamp"] for ep in meta.episodes] == [1.2, 2.1, 3.6]
    item = dataset[13]
    assert int(item["episode_index"]) == 1 and int(item["frame_index"]) == 1 and item["task"] == TASKS[1]
    np.testing.assert_array_equal(item["observation.state"].numpy(), truth["state"][1][1])
    assert float(item["next.reward"]) == truth["reward"][1][1]
    for episode, n in enumerate(truth["lengths"]):
        for camera in ("observation.images.top", "observation.images.wrist"):
            decoded = dataset.decode_episode(episode, camera)
            originals = truth["frames"][episode][camera]
            assert decoded.shape == originals.shape
            assert mean_abs_error(decoded, originals) < 6  # crf 18 on tiny 48x32 frames
            assert [best_matching_frame(f, originals) for f in decoded] == list(range(n))


def test_episodes_start_with_keyframes(written):
    root, _ = written
    with av.open(str(root / "videos/observation.images.top/chunk-000/file-000.mp4")) as container:
        keyframes = [i for i, frame in enumerate(container.decode(video=0)) if frame.key_frame]
    assert keyframes == [0, 12, 21]  # the episode starts (GOP of 20 frames gives no other one before 36)


def test_stats_json_matches_numpy(written):
    root, truth = written
    stats = json.loads((root / "meta/stats.json").read_text())
    assert set(stats) == {"observation.images.top", "observation.images.wrist", "observation.state", "action",
                          "next.reward", "timestamp", "frame_index", "episode_index", "index", "task_index"}
    actions = np.concatenate(truth["action"]).astype(np.float64)
    expected = {"min": actions.min(0), "max": actions.max(0), "mean": actions.mean(0), "std": actions.std(0)}
    expected.update({key: np.quantile(actions, q, axis=0) for key, q in zip(QUANTILE_KEYS, QUANTILES)})
    for key, value in expected.items():
        np.testing.assert_allclose(stats["action"][key], value, rtol=1e-9, atol=1e-12, err_msg=key)
    assert stats["action"]["count"] == [36]
    assert stats["index"]["max"] == [35] and stats["index"]["min"] == [0]
    image = {key: np.asarray(value) for key, value in stats["observation.images.top"].items()}
    assert image["mean"].shape == (3, 1, 1) and image["q50"].shape == (3, 1, 1)
    pixels = np.concatenate([truth["frames"][e]["observation.images.top"].reshape(-1, 3) for e in range(3)]) / 255
    np.testing.assert_allclose(image["mean"].reshape(3), pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(image["max"].reshape(3), pixels.max(0))
    # Per-episode stats are columns of the episodes parquet, as in LeRobot.
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet")
    np.testing.assert_allclose(episodes.column("stats/action/mean").to_pylist()[2], truth["action"][2].mean(0), rtol=1e-6)
    assert episodes.column("stats/action/q99").to_pylist()[0] == pytest.approx(
        np.quantile(truth["action"][0].astype(np.float64), 0.99, axis=0).tolist())


def test_small_file_limits_roll_over_chunks_and_files(tmp_path):
    truth = write_with_writer(tmp_path, lengths=(10, 10, 10, 10, 10), data_files_size_mb=0.002,
                              video_files_size_mb=0.004, chunks_size=2)
    data_files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("data/*/*.parquet"))
    video_files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("videos/observation.images.top/*/*.mp4"))
    assert len(data_files) > 1 and len(video_files) > 1
    assert any(name.startswith("data/chunk-001/") for name in data_files)  # 2 files per chunk
    dataset = load_lerobot_dataset(tmp_path)
    assert len(dataset) == 50
    episode = 4
    ep = dataset.meta.episode(episode)
    assert (ep["data/chunk_index"], ep["data/file_index"]) != (0, 0)
    np.testing.assert_array_equal(dataset[45]["action"].numpy(), truth["action"][4][5])
    decoded = dataset.decode_episode(episode, "top")
    assert [best_matching_frame(f, truth["frames"][episode]["observation.images.top"]) for f in decoded] == list(range(10))


def test_bad_episodes_are_rejected_before_writing(tmp_path):
    writer = LeRobotDatasetWriter(tmp_path / "ds", fps=10)
    frames = {"observation.images.top": synthetic_frames(5)}
    with pytest.raises(ValueError, match="different numbers of frames"):
        writer.add_episode(frames, task="t", action=np.zeros((4, 2)))
    with pytest.raises(EmptyEpisodeError, match="episode 0"):
        writer.add_episode({"observation.images.top": np.zeros((0, 32, 48, 3), np.uint8)}, task="t")
    with pytest.raises(ValueError, match="uint8"):
        writer.add_episode({"observation.images.top": synthetic_frames(5).astype(np.float32)}, task="t")
    with pytest.raises(ValueError, match="reserved"):
        writer.add_episode(frames, task="t", episode_metadata={"length": 3})
    assert writer.add_episode(frames, task="t", action=np.zeros((5, 2))) == 0
    with pytest.raises(ValueError, match="does not match the dataset's features"):
        writer.add_episode(frames, task="t", action=np.zeros((5, 3)))
    writer.finalize()
    dataset = load_lerobot_dataset(tmp_path / "ds")
    assert dataset.meta.total_episodes == 1 and len(dataset) == 5
    with pytest.raises(FileExistsError, match="overwrite=True"):
        LeRobotDatasetWriter(tmp_path / "ds", fps=10)


def test_context_manager_keeps_finished_episodes_after_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="simulator crashed"):
        with LeRobotDatasetWriter(tmp_path, fps=5, keyframe_interval=3) as writer:
            writer.add_episode({"observation.images.cam": synthetic_frames(4)}, task="a", state=np.ones((4, 2)))
            writer.add_episode({"observation.images.cam": synthetic_frames(6)}, task="b", state=np.ones((6, 2)))
            raise RuntimeError("simulator crashed")
    dataset = load_lerobot_dataset(tmp_path)
    assert dataset.meta.total_episodes == 2 and dataset.meta.tasks == ["a", "b"] and dataset.meta.fps == 5
    assert dataset.meta.features["observation.images.cam"]["info"]["video.g"] == 3
    assert dataset.decode_episode(1).shape == (6, 32, 48, 3)

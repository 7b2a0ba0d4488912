"""Reading LeRobot v3.0 and v2.1 folders built by hand (pyarrow + PyAV) following LeRobot's layout."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_fixtures import FPS, TASKS, best_matching_frame, build_v21_dataset, build_v30_dataset, mean_abs_error
from training.data import FrameTimestampError, LeRobotDataset, load_lerobot_dataset


@pytest.fixture(scope="module")
def v30(tmp_path_factory):
    root = tmp_path_factory.mktemp("v30")
    return root, build_v30_dataset(root)


@pytest.fixture(scope="module")
def v21(tmp_path_factory):
    root = tmp_path_factory.mktemp("v21")
    return root, build_v21_dataset(root)


def _check_items_match_truth(dataset, truth):
    starts = np.concatenate([[0], np.cumsum(truth["lengths"])])
    assert len(dataset) == starts[-1]
    for idx in range(len(dataset)):
        item = dataset[idx]
        episode = int(np.searchsorted(starts, idx, side="right") - 1)
        t = idx - starts[episode]
        assert int(item["episode_index"]) == episode and int(item["frame_index"]) == t
        assert int(item["index"]) == idx
        assert float(item["timestamp"]) == pytest.approx(t / FPS)
        assert item["task"] == truth["tasks"][episode]
        assert item["observation.state"].dtype == torch.float32 and item["action"].dtype == torch.float32
        np.testing.assert_array_equal(item["observation.state"].numpy(), truth["state"][episode][t])
        np.testing.assert_array_equal(item["action"].numpy(), truth["action"][episode][t])
        for camera in truth["cameras"]:
            image = item[camera]
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 48)
            originals = truth["frames"][episode][camera]
            # the decoded frame is the right one (nearest of all the episode's frames), within codec error
            assert best_matching_frame(image.permute(1, 2, 0).numpy(), originals) == t
            assert mean_abs_error(image.permute(1, 2, 0).numpy(), originals[t]) < 10


def test_v30_items_have_lerobot_keys_and_the_right_frames(v30):
    root, truth = v30
    dataset = load_lerobot_dataset(root)
    assert isinstance(dataset, LeRobotDataset)
    assert dataset.meta.codebase_version == "v3.0"
    _check_items_match_truth(dataset, truth)
    assert set(dataset[0]) >= {"observation.images.top", "observation.images.wrist", "observation.state", "action",
                               "episode_index", "frame_index", "timestamp", "index", "task", "task_index"}


def test_v30_metadata(v30):
    root, truth = v30
    meta = load_lerobot_dataset(root).meta
    assert meta.fps == FPS and meta.robot_type == "fixture_arm"
    assert meta.camera_keys == ["observation.images.top", "observation.images.wrist"]
    assert (meta.total_episodes, meta.total_frames, meta.tasks) == (3, 36, TASKS)
    assert [ep["length"] for ep in meta.episodes] == truth["lengths"]
    assert [ep["success"] for ep in meta.episodes] == truth["success"]
    assert [ep["tasks"] for ep in meta.episodes] == [[t] for t in truth["tasks"]]
    assert meta.episodes[2]["dataset_from_index"] == 21 and meta.episodes[2]["dataset_to_index"] == 36
    assert not any(key.startswith("stats/") for key in meta.episodes[0])  # left out, as LeRobot does
    # episodes 0 and 1 share one mp4: episode 1 starts where episode 0 ends
    path0, start0, end0 = meta.video_segment(0, "observation.images.top")
    path1, start1, end1 = meta.video_segment(1, "observation.images.top")
    assert path0 == path1 and (start0, end0, start1, end1) == (0.0, 1.2, 1.2, 2.1)
    np.testing.assert_allclose(meta.stats["action"]["mean"], np.concatenate(truth["action"]).mean(0), rtol=1e-6)


def test_v30_episode_subset_and_whole_episode_decoding(v30):
    root, truth = v30
    dataset = load_lerobot_dataset(root, episodes=[2, 1])
    assert dataset.episode_indices == [1, 2] and len(dataset) == 9 + 15
    item = dataset[9]
    assert int(item["episode_index"]) == 2 and int(item["frame_index"]) == 0 and int(item["index"]) == 21
    frames = dataset.decode_episode(1, "wrist")  # short camera name accepted
    assert frames.shape == (9, 32, 48, 3)
    originals = truth["frames"][1]["observation.images.wrist"]
    assert [best_matching_frame(f, originals) for f in frames] == list(range(9))
    with pytest.raises(KeyError, match=r"episodes \[5\] do not exist"):
        load_lerobot_dataset(root, episodes=[5])


def test_v21_items_and_metadata(v21):
    root, truth = v21
    dataset = load_lerobot_dataset(root)
    assert dataset.meta.codebase_version == "v2.1"
    _check_items_match_truth(dataset, truth)
    meta = dataset.meta
    assert meta.episodes[1]["dataset_from_index"] == 8 and meta.tasks == TASKS
    path, start, end = meta.video_segment(1, "observation.images.front")
    assert path.name == "episode_000001.mp4" and (start, end) == (0.0, 1.1)
    # stats aggregated from episodes_stats.jsonl
    all_actions = np.concatenate(truth["action"])
    np.testing.assert_allclose(meta.stats["action"]["mean"], all_actions.mean(0), rtol=1e-5)
    np.testing.assert_allclose(meta.stats["action"]["std"], all_actions.std(0), rtol=1e-5)
    np.testing.assert_allclose(meta.stats["action"]["min"], all_actions.min(0))


def test_timestamps_out_of_tolerance_name_the_file_and_episode(tmp_path):
    truth = build_v30_dataset(tmp_path, lengths=(6, 5, 4), cameras=("observation.images.top",), codec="libx264")
    # Shift episode 1's timestamps by 30 ms: the frames are no longer where the parquet says.
    path = tmp_path / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    timestamps = table.column("timestamp").to_numpy().copy()
    timestamps[np.asarray(table.column("episode_index")) == 1] += 0.03
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(timestamps))
    pq.write_table(table, path)

    strict = load_lerobot_dataset(tmp_path)
    assert strict[0]["task"] == truth["tasks"][0]  # episode 0 is fine
    with pytest.raises(FrameTimestampError) as caught:
        strict[7]
    message = str(caught.value)
    assert "episode 1" in message and "file-000.mp4" in message and "tolerance_s=0.0001" in message
    with pytest.raises(FrameTimestampError):
        strict.decode_episode(1)
    # A looser tolerance accepts the shifted frames, and they are the nearest ones.
    loose = load_lerobot_dataset(tmp_path, tolerance_s=0.05)
    frame = loose[7]["observation.images.top"].permute(1, 2, 0).numpy()
    assert best_matching_frame(frame, truth["frames"][1]["observation.images.top"]) == 1


def test_hub_repo_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="lapa-test/not-cached"):
        load_lerobot_dataset("lapa-test/not-cached")
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        load_lerobot_dataset("/no/such/folder/at/all")


def test_dataloader_workers_read_items(v30):
    root, truth = v30
    dataset = load_lerobot_dataset(root)
    dataset[0]  # open readers in the parent: the forked workers must not share them
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        assert batch["observation.images.top"].shape[1:] == (3, 32, 48)
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(36))

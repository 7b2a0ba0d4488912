"""Bad input: every case raises an error naming the file and the episode, or with skip_corrupt=True is
skipped, recorded in `.skipped` and counted in a logged summary. Nothing is dropped silently."""

import json
import logging
import shutil

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import build_v21_dataset, build_v30_dataset, encode_frames, synthetic_frames, write_with_writer
from training.data import (
    DataFileError,
    EmptyEpisodeError,
    FramePairDataset,
    FrameTimestampError,
    GapLongerThanEpisodeError,
    MissingCameraKeyError,
    UnsupportedCodebaseVersionError,
    VideoDecodeError,
    VideoFolderDataset,
    load_lerobot_dataset,
    make_streaming_frame_pairs,
)
from training.data.video import encode_video


@pytest.fixture(scope="module")
def v30_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("v30_clean")
    build_v30_dataset(root, cameras=("observation.images.top",), codec="libx264")
    return root


@pytest.fixture
def v30(v30_clean, tmp_path):
    """A fresh copy of a v3.0 dataset (episodes 0-1 share videos/.../chunk-000/file-000.mp4) to damage."""
    root = tmp_path / "ds"
    shutil.copytree(v30_clean, root)
    return root


def _skip_summary(caplog):
    return [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]


def test_corrupt_shared_video(v30, caplog):
    video = v30 / "videos/observation.images.top/chunk-000/file-000.mp4"
    video.write_bytes(np.random.default_rng(0).bytes(video.stat().st_size))
    with pytest.raises(VideoDecodeError) as caught:
        load_lerobot_dataset(v30)
    assert "episode 0" in str(caught.value) and "chunk-000/file-000.mp4" in str(caught.value)
    with caplog.at_level(logging.WARNING):
        dataset = load_lerobot_dataset(v30, skip_corrupt=True)
    assert dataset.episode_indices == [2] and len(dataset) == 15
    assert [(s.episode_index, s.error_type) for s in dataset.skipped] == [(0, "VideoDecodeError"), (1, "VideoDecodeError")]
    assert all(s.path.endswith("file-000.mp4") for s in dataset.skipped)
    assert any("skipped 2 episode(s)" in m and "2 VideoDecodeError" in m for m in _skip_summary(caplog))
    pairs = FramePairDataset(dataset, gap_seconds=0.3)
    assert len(pairs.skipped) == 2 and len(pairs) == 15  # the source's skips are carried along


def test_truncated_video_missing_its_index(tmp_path):
    build_v21_dataset(tmp_path)
    video = tmp_path / "videos/chunk-000/observation.images.front/episode_000001.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])  # the mp4 index (moov) is at the end
    with pytest.raises(VideoDecodeError, match=r"episode 1, video .*episode_000001.mp4: cannot open"):
        load_lerobot_dataset(tmp_path)
    dataset = load_lerobot_dataset(tmp_path, skip_corrupt=True)
    assert dataset.episode_indices == [0] and [s.episode_index for s in dataset.skipped] == [1]


def test_video_shorter_than_the_episode(tmp_path):
    build_v21_dataset(tmp_path, lengths=(8, 11))
    encode_frames(tmp_path / "videos/chunk-000/observation.images.front/episode_000001.mp4", [synthetic_frames(5)])
    with pytest.raises(VideoDecodeError, match=r"episode 1, .*lasts 0.500s but the episode's frames run to 1.100s"):
        load_lerobot_dataset(tmp_path)


def test_truncated_video_whose_header_claims_all_frames(tmp_path, caplog):
    """moov at the front (faststart): the file opens and claims every frame, but the data stops early.
    Found when decoding: the error names file and episode; streaming with skip_corrupt skips the episode."""
    build_v21_dataset(tmp_path, lengths=(8, 30))
    video = tmp_path / "videos/chunk-000/observation.images.front/episode_000001.mp4"
    encode_frames(video, [synthetic_frames(30, seed=4)], options={"g": "5", "crf": "18"},
                  container_options={"movflags": "+faststart"})
    data = video.read_bytes()
    video.write_bytes(data[: int(len(data) * 0.5)])
    dataset = load_lerobot_dataset(tmp_path)
    with pytest.raises((FrameTimestampError, VideoDecodeError)) as caught:
        dataset.decode_episode(1)
    assert "episode 1" in str(caught.value) and "episode_000001.mp4" in str(caught.value)
    with caplog.at_level(logging.WARNING):
        pairs = FramePairDataset(dataset, gap_seconds=0.2, image_size=8, skip_corrupt=True)
        items = list(make_streaming_frame_pairs(pairs))
    assert {it["episode_index"] for it in items} == {0} and len(items) == 8
    assert any("skipped episode 1" in r.getMessage() for r in caplog.records)
    with pytest.raises((FrameTimestampError, VideoDecodeError)):
        list(make_streaming_frame_pairs(FramePairDataset(dataset, gap_seconds=0.2, image_size=8)))


def test_missing_camera_key_lists_the_available_ones(v30_clean):
    dataset = load_lerobot_dataset(v30_clean)
    with pytest.raises(MissingCameraKeyError) as caught:
        FramePairDataset(dataset, camera_key="observation.images.side")
    message = str(caught.value)
    assert "'observation.images.side'" in message and "['observation.images.top']" in message
    assert "info.json" in message
    with pytest.raises(KeyError):  # also a KeyError, for code that catches those
        dataset.decode_episode(0, "side")


def test_empty_episode(v30):
    # Append an episode of length 0 to the metadata (no frame rows, an empty video range).
    path = v30 / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(path).to_pylist()
    empty = dict(rows[-1], episode_index=3, length=0, dataset_from_index=36, dataset_to_index=36)
    empty["videos/observation.images.top/from_timestamp"] = empty["videos/observation.images.top/to_timestamp"]
    pq.write_table(pa.Table.from_pylist(rows + [empty]), path)
    with pytest.raises(EmptyEpisodeError, match=r"episode 3 \(.*file-001.parquet\) has no frames"):
        load_lerobot_dataset(v30)
    dataset = load_lerobot_dataset(v30, skip_corrupt=True)
    assert dataset.episode_indices == [0, 1, 2]
    assert [(s.episode_index, s.error_type) for s in dataset.skipped] == [(3, "EmptyEpisodeError")]


def test_empty_video_in_a_folder(tmp_path):
    with av.open(str(tmp_path / "7.avi"), "w") as container:  # a valid avi with a video stream and no frame
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        container.start_encoding()
    encode_video(tmp_path / "8.mp4", synthetic_frames(6), fps=10)
    (tmp_path / "labels.json").write_text(json.dumps({"7": "nothing happens", "8": "something happens"}))
    with pytest.raises(EmptyEpisodeError, match=r"episode 0 \(.*7.avi\) has no frames"):
        VideoFolderDataset(tmp_path, tmp_path / "labels.json")
    dataset = VideoFolderDataset(tmp_path, tmp_path / "labels.json", skip_corrupt=True)
    assert [v["video_id"] for v in dataset.videos] == ["8"] and len(dataset.skipped) == 1


def test_gap_longer_than_an_episode(tmp_path, caplog):
    write_with_writer(tmp_path, lengths=(12, 5, 9))
    dataset = load_lerobot_dataset(tmp_path)
    with pytest.raises(GapLongerThanEpisodeError) as caught:
        FramePairDataset(dataset, gap_seconds=0.6)  # 6 frames; episode 1 has 5
    message = str(caught.value)
    assert "episode 1" in message and "5 frames" in message and "gap is 6 frames" in message and ".mp4" in message
    with caplog.at_level(logging.WARNING):
        pairs = FramePairDataset(dataset, gap_seconds=0.6, skip_corrupt=True)
    assert pairs.episode_indices == [0, 2] and len(pairs) == 12 + 9
    assert [(s.episode_index, s.error_type) for s in pairs.skipped] == [(1, "GapLongerThanEpisodeError")]
    assert any("skipped 1 episode(s)" in m for m in _skip_summary(caplog))
    with pytest.raises(GapLongerThanEpisodeError):
        FramePairDataset(dataset, gap_seconds=0.9, drop_crossing=True)  # 9 frames: episode 1 again


def test_unknown_codebase_version(v30):
    info_path = v30 / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["codebase_version"] = "v9.9"
    info_path.write_text(json.dumps(info))
    with pytest.raises(UnsupportedCodebaseVersionError) as caught:
        load_lerobot_dataset(v30)
    message = str(caught.value)
    assert "meta/info.json" in message and "'v9.9'" in message and "v3.0" in message and "v2.1" in message


def test_missing_and_inconsistent_data_files(v30):
    (v30 / "data/chunk-000/file-001.parquet").unlink()
    with pytest.raises(DataFileError, match=r"episode 2, .*file-001.parquet: data file not found"):
        load_lerobot_dataset(v30)
    dataset = load_lerobot_dataset(v30, skip_corrupt=True)
    assert dataset.episode_indices == [0, 1] and [s.episode_index for s in dataset.skipped] == [2]
    # rows missing from a data file: the episode's length no longer matches its metadata
    path = v30 / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, len(table) - 2), path)
    with pytest.raises(DataFileError, match=r"episode 1, .*has 7 frame rows .* length 9"):
        load_lerobot_dataset(v30, episodes=[0, 1])


def test_video_folder_missing_and_corrupt_videos(tmp_path, caplog):
    encode_video(tmp_path / "a.mp4", synthetic_frames(6), fps=10)
    (tmp_path / "b.webm").write_bytes(b"not a video at all" * 50)
    (tmp_path / "labels.jsonl").write_text(
        "".join(json.dumps({"id": k, "label": v}) + "\n" for k, v in {"a": "x", "b": "y", "c": "z"}.items()))
    with pytest.raises(VideoDecodeError, match=r"episode 1, video .*b.webm"):
        VideoFolderDataset(tmp_path, tmp_path / "labels.jsonl")
    (tmp_path / "b.webm").unlink()
    with pytest.raises(VideoDecodeError, match="no video file for label id 'b'"):
        VideoFolderDataset(tmp_path, tmp_path / "labels.jsonl")
    with caplog.at_level(logging.WARNING):
        dataset = VideoFolderDataset(tmp_path, tmp_path / "labels.jsonl", skip_corrupt=True)
    assert dataset.episode_indices == [0] and [s.episode_index for s in dataset.skipped] == [1, 2]
    assert any("skipped 2 episode(s)" in m for m in _skip_summary(caplog))

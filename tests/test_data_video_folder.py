"""Human-video folders (Something-Something v2's layout): labels in json/jsonl/csv, mp4/webm/avi videos,
captions as instructions, fps read from each container, and the same frame-pair interface."""

import json

import numpy as np
import pytest
import torch

from data_fixtures import best_matching_frame, synthetic_frames
from training.data import (
    FramePairDataset,
    MissingCameraKeyError,
    VideoFolderDataset,
    make_streaming_frame_pairs,
    read_video_labels,
)
from training.data.video import encode_video

CAPTIONS = {"1001": "putting a cup onto a table", "1002": "pushing a box from left to right", "1003": "opening a jar"}


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    """Three videos of different containers and frame rates, and an SSv2-style labels list."""
    root = tmp_path_factory.mktemp("ssv2")
    videos = root / "20bn-something-something-v2"
    frames = {"1001": synthetic_frames(14, seed=1), "1002": synthetic_frames(9, seed=2), "1003": synthetic_frames(20, seed=3)}
    encode_video(videos / "1001.webm", frames["1001"], fps=12, codec="libvpx-vp9", crf=20)
    encode_video(videos / "1002.mp4", frames["1002"], fps=10, crf=18)
    encode_video(videos / "1003.avi", frames["1003"], fps=15, codec="mpeg4")
    encode_video(videos / "9999.mp4", synthetic_frames(3), fps=10)  # another split's video: not labelled
    labels = [{"id": key, "label": caption, "template": "Doing [something]", "placeholders": ["x"]}
              for key, caption in CAPTIONS.items()]
    (root / "train.json").write_text(json.dumps(labels))
    return videos, root / "train.json", frames


def test_labels_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(CAPTIONS))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"video_id": k, "caption": v}) + "\n" for k, v in CAPTIONS.items()))
    (tmp_path / "c.csv").write_text("id,text\n" + "".join(f'{k},"{v}"\n' for k, v in CAPTIONS.items()))
    (tmp_path / "d.csv").write_text("".join(f"{k}.mp4,{v}\n" for k, v in CAPTIONS.items()))
    (tmp_path / "e.tsv").write_text("name\tinstruction\n" + "".join(f"{k}\t{v}\n" for k, v in CAPTIONS.items()))
    for name in ("a.json", "b.jsonl", "c.csv", "e.tsv"):
        assert read_video_labels(tmp_path / name) == CAPTIONS, name
    assert read_video_labels(tmp_path / "d.csv") == {f"{k}.mp4": v for k, v in CAPTIONS.items()}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "1", "what": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1.*caption field"):
        read_video_labels(tmp_path / "bad.jsonl")


def test_videos_are_episodes_with_captions_and_container_fps(ssv2):
    videos, labels, frames = ssv2
    dataset = VideoFolderDataset(videos, labels)
    assert len(dataset) == 3 and dataset.episode_indices == [0, 1, 2] and not dataset.skipped
    assert [dataset.episode_task(e) for e in range(3)] == list(CAPTIONS.values())
    assert [dataset.episode_fps(e) for e in range(3)] == [12.0, 10.0, 15.0]
    assert [dataset.episode_length(e) for e in range(3)] == [14, 9, 20]
    assert dataset.episode_first_index(2) == 14 + 9
    item = dataset[0]
    assert item["video_id"] == "1001" and item["task"] == CAPTIONS["1001"]
    assert item["frames"].shape == (14, 3, 32, 48) and item["frames"].dtype == torch.uint8
    decoded = item["frames"].permute(0, 2, 3, 1).numpy()
    assert [best_matching_frame(f, frames["1001"]) for f in decoded] == list(range(14))


def test_frame_pairs_from_video_folder(ssv2):
    videos, labels, frames = ssv2
    dataset = VideoFolderDataset(videos, labels)
    pairs = FramePairDataset(dataset, gap_seconds=0.5, image_size=24)
    # 0.5 s is 6 frames at 12 fps, 5 at 10 fps, 8 (7.5 rounded) at 15 fps
    assert [pairs.gap_frames(e) for e in range(3)] == [6, 5, 8]
    assert len(pairs) == 14 + 9 + 20
    item = pairs[14 + 9 + 3]
    assert item["pixel_values"].shape == (2, 3, 24, 24) and item["task"] == CAPTIONS["1003"]
    assert (item["frame_index"], item["target_frame_index"]) == (3, 11) and "action" not in item
    full = FramePairDataset(dataset, gap_seconds=0.5, output="uint8")[14 + 9 + 3]["pixel_values"]
    images = full.permute(0, 2, 3, 1).numpy()
    assert [best_matching_frame(image, frames["1003"]) for image in images] == [3, 11]
    streamed = list(make_streaming_frame_pairs(FramePairDataset(dataset, gap_seconds=0.5, image_size=8, output="uint8")))
    assert sorted(it["index"] for it in streamed) == list(range(43))
    with pytest.raises(MissingCameraKeyError, match=r"available camera keys: \['video'\]"):
        FramePairDataset(dataset, camera_key="observation.images.top")

"""Human videos without actions: a folder of video files plus a labels file giving each video's caption.

Something-Something v2 is the model layout: `20bn-something-something-v2/<id>.webm` and a labels file
`something-something-v2-train.json`, a list of {"id": "78687", "label": "holding potato next to vicks
vaporub bottle", "template": ..., "placeholders": ...}. Read as labels:

- json: {"<id>": "<caption>", ...}, or a list of objects with an id field and a caption field;
- jsonl: one such object per line;
- csv/tsv: a header naming an id column and a caption column, or rows of exactly (id, caption).

Id fields: "id", "video_id", "video", "name", "file"; caption fields, in order of preference: "caption",
"label", "text", "instruction", "task", "narration", "template". An id may carry the file extension.

Each labelled video is one episode (the caption is its task) of one camera named "video"; `FramePairDataset`
and `make_streaming_frame_pairs` read it like a LeRobot dataset, with the fps read from each container.
Labels whose video is missing, and unreadable or empty videos, raise an error naming the file, or with
`skip_corrupt=True` are skipped and listed in `.skipped`. Videos of the folder that have no label (e.g. the
other splits of SSv2) are not used; their number is logged.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import (
    DataLayerError,
    EmptyEpisodeError,
    MissingCameraKeyError,
    SkippedEpisode,
    VideoDecodeError,
    log_skip_summary,
    skipped_from_error,
)
from .video import VideoFrameReader, count_video_packets, probe_video

logger = logging.getLogger(__name__)

VIDEO_CAMERA_KEY = "video"
ID_FIELDS = ("id", "video_id", "video", "name", "file")
CAPTION_FIELDS = ("caption", "label", "text", "instruction", "task", "narration", "template")


def _id_and_caption(record: dict, *, where: str) -> tuple[str, str]:
    id_field = next((f for f in ID_FIELDS if f in record), None)
    caption_field = next((f for f in CAPTION_FIELDS if f in record), None)
    if id_field is None or caption_field is None:
        raise ValueError(
            f"{where}: a label record needs an id field (one of {ID_FIELDS}) and a caption field "
            f"(one of {CAPTION_FIELDS}); got fields {sorted(record)}"
        )
    return str(record[id_field]), str(record[caption_field])


def read_video_labels(labels_file: str | Path) -> dict[str, str]:
    """{video id: caption} from a json, jsonl or csv/tsv labels file, in the file's order."""
    path = Path(labels_file)
    if not path.exists():
        raise FileNotFoundError(f"labels file {path} not found")
    suffix = path.suffix.lower()
    labels: dict[str, str] = {}
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            labels = {str(k): str(v) for k, v in data.items()}
        elif isinstance(data, list):
            for i, record in enumerate(data):
                video_id, caption = _id_and_caption(record, where=f"{path} item {i}")
                labels[video_id] = caption
        else:
            raise ValueError(f"{path}: expected a json object or list, got {type(data).__name__}")
    elif suffix == ".jsonl":
        with open(path) as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    video_id, caption = _id_and_caption(json.loads(line), where=f"{path} line {line_number}")
                    labels[video_id] = caption
    elif suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
        if not rows:
            return {}
        header = [cell.strip().lower() for cell in rows[0]]
        if any(field in header for field in ID_FIELDS):
            records = [dict(zip(header, row)) for row in rows[1:] if row]
            for line_number, record in enumerate(records, 2):
                video_id, caption = _id_and_caption(record, where=f"{path} line {line_number}")
                labels[video_id] = caption
        else:
            for line_number, row in enumerate(rows, 1):
                if not row:
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path} line {line_number}: expected 'id,caption', got {row}")
                labels[row[0].strip()] = row[1].strip()
    else:
        raise ValueError(f"{path}: labels must be .json, .jsonl, .csv or .tsv")
    return labels


class VideoFolderDataset:
    """Videos of a folder (one episode each) with their captions as tasks.

    Args:
        root: folder searched recursively for videos.
        labels_file: json/jsonl/csv mapping a video id (file name without extension) to its caption.
        video_extensions: file extensions that are videos.
        skip_corrupt: skip (and list in `.skipped`) labelled videos that are missing, unreadable or empty.

    Items (`dataset[i]`): {"video_id", "path", "task", "fps", "frames": (T, 3, H, W) uint8 tensor}.
    """

    camera_keys = [VIDEO_CAMERA_KEY]

    def __init__(
        self,
        root: str | Path,
        labels_file: str | Path,
        *,
        video_extensions: tuple[str, ...] = (".mp4", ".webm", ".avi"),
        skip_corrupt: bool = False,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} not found")
        self.labels_file = Path(labels_file)
        self.skip_corrupt = skip_corrupt
        self.skipped: list[SkippedEpisode] = []
        extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in video_extensions}
        files: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.suffix.lower() in extensions:
                if path.stem in files:
                    raise ValueError(f"two videos have the id {path.stem!r}: {files[path.stem]} and {path}")
                files[path.stem] = path
        labels = read_video_labels(self.labels_file)

        self.videos: list[dict] = []  # {"video_id", "path", "task", "fps", "num_frames"}, position = episode
        labelled_ids = set()
        for label_id, caption in tqdm(labels.items(), desc="probing videos", disable=len(labels) < 200):
            video_id = Path(label_id).stem if Path(label_id).suffix.lower() in extensions else label_id
            labelled_ids.add(video_id)
            episode_index = len(self.videos) + len(self.skipped)
            path = files.get(video_id)
            try:
                if path is None:
                    raise VideoDecodeError(
                        self.root / f"{video_id}{{{','.join(sorted(extensions))}}}",
                        f"no video file for label id {video_id!r} of {self.labels_file}",
                        episode_index=episode_index,
                    )
                self.videos.append(self._probe(path, video_id, caption, episode_index))
            except DataLayerError as error:
                if not skip_corrupt:
                    raise
                self.skipped.append(skipped_from_error(error, episode_index=episode_index, path=path or self.root))
        unlabelled = len(set(files) - labelled_ids)
        if unlabelled:
            logger.info("%s: %d videos have no label in %s and are not used", self.root, unlabelled, self.labels_file)
        log_skip_summary(logger, self.skipped, what=str(self.root))
        # Episode indices count labels (skipped ones too), so that an index names the same video whatever
        # was skipped.
        self.episode_indices = [video["episode_index"] for video in self.videos]
        self._by_episode = {video["episode_index"]: video for video in self.videos}
        lengths = np.array([video["num_frames"] for video in self.videos], dtype=np.int64)
        self._first_index = dict(zip(self.episode_indices, np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()))

    @staticmethod
    def _probe(path: Path, video_id: str, caption: str, episode_index: int) -> dict:
        try:
            info = probe_video(path)
            num_frames = info.num_frames if info.num_frames else count_video_packets(path)
        except VideoDecodeError as error:
            raise VideoDecodeError(path, error.reason, episode_index=episode_index) from error
        if num_frames == 0:
            raise EmptyEpisodeError(path, episode_index=episode_index)
        if not info.fps:
            raise VideoDecodeError(path, "the container has no frame rate", episode_index=episode_index)
        return {
            "episode_index": episode_index,
            "video_id": video_id,
            "path": path,
            "task": caption,
            "fps": info.fps,
            "num_frames": num_frames,
        }

    # -- the episode interface of the frame-pair datasets ------------------------------------------------
    def resolve_camera_key(self, camera_key: str | None) -> str:
        if camera_key in (None, VIDEO_CAMERA_KEY):
            return VIDEO_CAMERA_KEY
        raise MissingCameraKeyError(camera_key, self.camera_keys, where=str(self.root))

    def episode_length(self, episode_index: int) -> int:
        return int(self._by_episode[episode_index]["num_frames"])

    def episode_fps(self, episode_index: int) -> float:
        return float(self._by_episode[episode_index]["fps"])

    def episode_task(self, episode_index: int, frame_index: int = 0) -> str:
        return self._by_episode[episode_index]["task"]

    def episode_actions(self, episode_index: int) -> None:
        return None  # human videos have no actions

    def episode_first_index(self, episode_index: int) -> int:
        return int(self._first_index[episode_index])

    def describe_episode(self, episode_index: int, camera_key: str | None = None) -> str:
        return str(self._by_episode[episode_index]["path"])

    def decode_episode(
        self, episode_index: int, camera_key: str | None = None, *, size: int | tuple[int, int] | None = None
    ) -> np.ndarray:
        """All frames of a video, decoded once: (T, H, W, 3) uint8, T as probed at load time."""
        self.resolve_camera_key(camera_key)
        video = self._by_episode[episode_index]
        try:
            with VideoFrameReader(video["path"]) as reader:
                frames, _ = reader.read_all(size=size)
        except VideoDecodeError as error:
            raise VideoDecodeError(video["path"], error.reason, episode_index=episode_index) from error
        expected = video["num_frames"]
        if len(frames) < expected:
            raise VideoDecodeError(
                video["path"],
                f"decoded {len(frames)} frames but the file announced {expected} (truncated or corrupt)",
                episode_index=episode_index,
            )
        return frames[:expected]

    def read_frames(self, episode_index: int, camera_key: str | None, frame_indices, *, size=None) -> np.ndarray:
        """Some frames of a video: (N, H, W, 3) uint8 (decodes the video; its timestamps are not indexed)."""
        return self.decode_episode(episode_index, camera_key, size=size)[np.asarray(frame_indices)]

    # -- map-style access to whole videos ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, idx: int) -> dict:
        video = self.videos[idx]
        frames = self.decode_episode(video["episode_index"])
        return {
            "video_id": video["video_id"],
            "path": str(video["path"]),
            "task": video["task"],
            "fps": video["fps"],
            "episode_index": video["episode_index"],
            "frames": torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))),
        }

    def __repr__(self) -> str:
        return f"VideoFolderDataset(root={str(self.root)!r}, videos={len(self.videos)}, skipped={len(self.skipped)})"

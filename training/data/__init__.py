"""The video data layer: LeRobot datasets (read v3.0/v2.1, write v3.0), human-video folders, frame pairs and VLA
frames, episode splits, and the latent-action labels a labelled dataset carries.

    from training.data import FramePairDataset, LatentLabelLayout, load_lerobot_dataset, make_streaming_frame_pairs
    from training.data import split_episodes

    robot = load_lerobot_dataset("outputs/metaworld")                 # folder or Hub repo id
    train, held = split_episodes(robot, 0.1, seed=0)                   # episodes, stratified by task
    pairs = FramePairDataset(robot, gap_seconds=0.6, image_size=128, episodes=train)   # (2, 3, 128, 128) pairs
    stream = make_streaming_frame_pairs(pairs, seed=0, rank=0, world_size=2)          # datasets.IterableDataset
    layout = LatentLabelLayout.read(load_lerobot_dataset("outputs/metaworld_latent"))  # codebook size, gap, ...

Modules: `video` (PyAV decode/encode), `lerobot_reader`, `lerobot_writer`, `lerobot_format` (format facts),
`lerobot_legacy` (v2.x -> v3.0 without re-encoding), `files` (atomic writes, links), `stats`, `episode_frames`
(the base of `frame_pairs` and `vla_frames`), `episode_stream` (their streaming), `splits`, `latent_actions`
(the labels' column, feature and `LatentLabelLayout`), `video_folder`, `errors`.
"""

from .episode_frames import EpisodeFrameDataset
from .errors import (
    DataFileError,
    DataLayerError,
    EmptyEpisodeError,
    FrameTimestampError,
    GapLongerThanEpisodeError,
    LabellingRecordError,
    MissingCameraKeyError,
    SkippedEpisode,
    UnsupportedCodebaseVersionError,
    VideoDecodeError,
)
from .frame_pairs import FramePairDataset, gap_in_frames, make_streaming_frame_pairs
from .latent_actions import LABELLING_INFO_KEY, LATENT_ACTION_KEY, UNLABELLED_CODE, LatentLabelLayout
from .lerobot_reader import LeRobotDataset, LeRobotDatasetMetadata, load_lerobot_dataset, resolve_dataset_root
from .lerobot_writer import LeRobotDatasetWriter
from .splits import EpochSampler, split_episodes
from .video import VideoEncoder, VideoFrameReader, decode_video, encode_video, probe_video
from .video_folder import VideoFolderDataset, read_video_labels
from .vla_frames import VLAFrameDataset, collate_vla_frames, make_streaming_vla_frames

__all__ = [
    "LABELLING_INFO_KEY",
    "LATENT_ACTION_KEY",
    "UNLABELLED_CODE",
    "DataFileError",
    "DataLayerError",
    "EmptyEpisodeError",
    "EpisodeFrameDataset",
    "EpochSampler",
    "FramePairDataset",
    "FrameTimestampError",
    "GapLongerThanEpisodeError",
    "LabellingRecordError",
    "LatentLabelLayout",
    "LeRobotDataset",
    "LeRobotDatasetMetadata",
    "LeRobotDatasetWriter",
    "MissingCameraKeyError",
    "SkippedEpisode",
    "UnsupportedCodebaseVersionError",
    "VLAFrameDataset",
    "VideoDecodeError",
    "VideoEncoder",
    "VideoFolderDataset",
    "VideoFrameReader",
    "collate_vla_frames",
    "decode_video",
    "encode_video",
    "gap_in_frames",
    "load_lerobot_dataset",
    "make_streaming_frame_pairs",
    "make_streaming_vla_frames",
    "probe_video",
    "read_video_labels",
    "resolve_dataset_root",
    "split_episodes",
]

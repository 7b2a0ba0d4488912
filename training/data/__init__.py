"""The video data layer: LeRobot datasets (read v3.0/v2.1, write v3.0), human-video folders, frame pairs.

    from training.data import load_lerobot_dataset, FramePairDataset, make_streaming_frame_pairs

    robot = load_lerobot_dataset("outputs/metaworld")                 # folder or Hub repo id
    pairs = FramePairDataset(robot, gap_seconds=0.6, image_size=128)   # (2, 3, 128, 128) float pairs
    stream = make_streaming_frame_pairs(robot, image_size=128, rank=0, world_size=2)

Modules: `video` (PyAV decode/encode), `lerobot_reader`, `lerobot_writer`, `lerobot_format` (format facts),
`stats`, `frame_pairs`, `splits` (held-out episodes, epoch samplers), `latent_actions` (the labels' column, feature and
`LatentLabelLayout`, the record labelling hands to the VLA stage), `video_folder`, `errors`.
"""

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

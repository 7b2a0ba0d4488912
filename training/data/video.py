"""Video decoding and encoding with PyAV (FFmpeg), the only video backend of the toolkit.

Decoding: `VideoFrameReader` keeps one container open per file and decodes forward. When the next request
starts at or shortly after the last decoded frame (reading an episode's frames in order, or the next
episode of a shared LeRobot v3.0 mp4), it goes on decoding instead of seeking again: a seek always goes back
to the previous keyframe and re-decodes everything up to the requested time, which is what makes per-frame
random access slow.

Encoding: `VideoEncoder` appends frames to one mp4 incrementally (episode after episode in LeRobot v3.0's
shared files) with a configurable codec, CRF, keyframe interval and pixel format, and forces a keyframe at the
first frame of each appended block so that every episode starts with a keyframe and decodes on its own.

Arrays are RGB uint8 laid out (T, H, W, 3); timestamps are seconds from the start of the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from .errors import FrameTimestampError, VideoDecodeError

logger = logging.getLogger(__name__)

# Codecs whose FFmpeg wrappers take a `crf` option (constant quality).
_CRF_CODECS = {"libx264", "libx265", "libsvtav1", "libvpx-vp9", "libaom-av1"}
# Codecs that make a forced keyframe an IDR frame only when asked (otherwise it can be a non-seekable I frame).
_FORCED_IDR_CODECS = {"libx264", "libx265"}


def _as_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """`size` as (height, width): an int means a square."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def frame_to_rgb(
    frame: av.VideoFrame,
    size: int | tuple[int, int] | None = None,
    reformatter: VideoReformatter | None = None,
) -> np.ndarray:
    """A decoded frame as an RGB uint8 array (H, W, 3), resized by FFmpeg's swscale when `size` is given.

    Resizing here, during decoding, costs much less than converting the full frame and resizing afterwards.
    `size` is an int (square S x S, the aspect ratio is not kept, like `Resize((S, S))`) or (height, width).
    Pass the same `reformatter` for the frames of a video: it keeps FFmpeg's scaler between frames, which
    makes the conversion several times faster than `frame.to_ndarray(...)` setting one up for every frame.
    The scaler runs single-threaded (threads=1): one with its own threads hangs when a forked DataLoader
    worker frees the copy it inherited (it joins threads that do not exist in the child).
    """
    reformatter = reformatter or VideoReformatter()
    hw = _as_size(size)
    if hw is None or (hw[0] == frame.height and hw[1] == frame.width):
        return reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
    # AREA averages the source pixels under each target pixel: the right filter for downscaling.
    return reformatter.reformat(
        frame, width=hw[1], height=hw[0], format="rgb24", interpolation="AREA", threads=1
    ).to_ndarray()


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a file's first video stream."""

    path: str
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str | None
    num_frames: int | None  # None when the container does not store it (e.g. most webm files)
    duration_s: float | None
    has_audio: bool


def open_video(
    path: str | Path, *, decoder_threads: int = 1
) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Opens a file and returns (container, first video stream); any failure becomes a `VideoDecodeError`.

    Decoding is single-threaded by default: parallelism comes from DataLoader workers, and a decoder with
    no threads of its own is safe across `fork` (a forked worker that frees a container inherited with
    FFmpeg worker threads can hang joining threads that do not exist in the child). 0 means FFmpeg's auto.
    """
    path = str(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoDecodeError(path, f"cannot open the file ({error})") from error
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "the file has no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = decoder_threads
    return container, stream


def probe_video(path: str | Path) -> VideoInfo:
    """Reads the container header only (no decoding). Raises `VideoDecodeError` for unreadable files."""
    container, stream = open_video(path)
    try:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        duration_s = None
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        return VideoInfo(
            path=str(path),
            fps=float(rate) if rate else 0.0,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt,
            num_frames=int(stream.frames) if stream.frames else None,
            duration_s=duration_s,
            has_audio=bool(container.streams.audio),
        )
    finally:
        container.close()


def count_video_packets(path: str | Path) -> int:
    """Counts the video stream's packets by demuxing without decoding: the frame count of files (like webm)
    whose header does not store it. Raises `VideoDecodeError` if the file cannot be demuxed to the end."""
    container, stream = open_video(path)
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size:  # the demuxer ends with an empty flush packet
                count += 1
    except av.FFmpegError as error:
        raise VideoDecodeError(path, f"demuxing failed after {count} packets ({error})") from error
    finally:
        container.close()
    return count


class VideoFrameReader:
    """Reads the frames of one video file by time, reusing one open container.

    A request that starts shortly after the last decoded frame (at most `forward_decode_limit_s` later)
    continues the current decode instead of seeking. Not thread-safe; one reader per process (the readers of
    `LeRobotDataset` are opened lazily in each DataLoader worker).
    """

    def __init__(self, path: str | Path, *, forward_decode_limit_s: float = 2.0, decoder_threads: int = 1):
        self.path = str(path)
        self.forward_decode_limit_s = forward_decode_limit_s
        self.decoder_threads = decoder_threads
        self._container = None
        self._stream = None
        self._decoder = None  # iterator over decoded frames from the last seek
        self._pending: av.VideoFrame | None = None  # decoded but not yet returned
        self._last_time: float | None = None  # time of the last frame taken from the decoder
        self._reformatter = VideoReformatter()  # reused: keeps FFmpeg's scaler between frames
        self._fallback_fps = 30.0

    # -- container state -------------------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._container is None:
            self._container, self._stream = open_video(self.path, decoder_threads=self.decoder_threads)
            rate = self._stream.average_rate or self._stream.guessed_rate
            if rate:
                self._fallback_fps = float(rate)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._stream = self._decoder = self._pending = self._last_time = None

    def __enter__(self) -> VideoFrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # An open container cannot cross a process boundary; a copy reopens the file lazily.
        state = self.__dict__.copy()
        state.update(_container=None, _stream=None, _decoder=None, _pending=None, _last_time=None)
        state.pop("_reformatter", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reformatter = VideoReformatter()

    def _frame_time(self, frame: av.VideoFrame) -> float:
        if frame.pts is not None and frame.time_base is not None:
            return float(frame.pts * frame.time_base)
        # No pts (rare, some raw streams): assume a constant rate after the previous frame.
        previous = self._last_time if self._last_time is not None else -1.0 / self._fallback_fps
        return previous + 1.0 / self._fallback_fps

    def _next_frame(self) -> av.VideoFrame | None:
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        try:
            frame = next(self._decoder)
        except StopIteration:
            return None
        except av.FFmpegError as error:
            raise VideoDecodeError(self.path, f"decoding failed after {self._last_time}s ({error})") from error
        return frame

    def _seek(self, time_s: float) -> None:
        """Positions the decoder at the last keyframe at or before `time_s`."""
        self._ensure_open()
        stream = self._stream
        self._pending = None
        self._last_time = None
        target = max(0.0, time_s)
        # FFmpeg's mp4 seek can land one keyframe late (it indexes by decode time); back off until the first
        # decoded frame is not after the target.
        for backoff_s in (0.0, 0.5, 2.0, None):
            position = 0.0 if backoff_s is None else max(0.0, target - backoff_s)
            try:
                offset = stream.start_time or 0
                self._container.seek(
                    int(position / stream.time_base) + offset, stream=stream, backward=True, any_frame=False
                )
            except av.FFmpegError as error:
                raise VideoDecodeError(self.path, f"seek to {position:.3f}s failed ({error})") from error
            self._decoder = self._container.decode(stream)
            first = self._next_frame()
            if first is None:
                if position == 0.0:
                    return
                continue
            self._pending = first
            if self._frame_time(first) <= target + 1e-6 or position == 0.0:
                return

    def _can_continue_from(self, start_s: float, tolerance_s: float) -> bool:
        """Whether decoding on from the current position reaches `start_s` without skipping a frame at or
        after it, and without decoding more than `forward_decode_limit_s` of video to get there."""
        if self._decoder is None:
            return False
        if self._last_time is not None:  # frames up to _last_time were consumed; all later ones are ahead
            return self._last_time < start_s - tolerance_s and start_s - self._last_time <= self.forward_decode_limit_s
        if self._pending is not None:  # just after a seek: the pending frame is the first one decoded
            pending_time = self._frame_time(self._pending)
            return pending_time <= start_s + tolerance_s and start_s - pending_time <= self.forward_decode_limit_s
        return False

    # -- reading -----------------------------------------------------------------------------------------
    def _decode_window(self, start_s: float, end_s: float, tolerance_s: float) -> tuple[list, list[float]]:
        """Decoded (not yet converted) frames with start_s - tol <= t < end_s - tol, and their times."""
        self._ensure_open()
        if not self._can_continue_from(start_s, tolerance_s):
            self._seek(start_s)
        frames, times = [], []
        while True:
            frame = self._next_frame()
            if frame is None:
                break
            time_s = self._frame_time(frame)
            if time_s >= end_s - tolerance_s:
                self._pending = frame  # the first frame of what comes next (e.g. the next episode)
                break
            self._last_time = time_s
            if time_s < start_s - tolerance_s:
                continue  # decoded only to reach the start (frames after the keyframe)
            frames.append(frame)
            times.append(time_s)
        return frames, times

    def _to_rgb(self, frames: list, times: list[float], size) -> np.ndarray:
        """Converts decoded frames to one (N, H, W, 3) uint8 array."""
        if not frames:
            hw = _as_size(size) or (self._stream.codec_context.height, self._stream.codec_context.width)
            return np.zeros((0, hw[0], hw[1], 3), dtype=np.uint8)
        arrays = []
        for frame, time_s in zip(frames, times):
            try:
                arrays.append(frame_to_rgb(frame, size, self._reformatter))
            except (av.FFmpegError, ValueError) as error:
                raise VideoDecodeError(self.path, f"cannot convert the frame at {time_s:.3f}s ({error})") from error
        return np.stack(arrays)

    def read_between(
        self,
        start_s: float,
        end_s: float,
        *,
        size: int | tuple[int, int] | None = None,
        tolerance_s: float = 1e-4,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decodes the frames whose time t satisfies start_s - tol <= t < end_s - tol.

        Returns (frames (N, H, W, 3) uint8, times (N,) float64 seconds). `size` resizes while decoding.
        """
        frames, times = self._decode_window(start_s, end_s, tolerance_s)
        return self._to_rgb(frames, times, size), np.asarray(times, dtype=np.float64)

    def read_at(
        self,
        timestamps: list[float] | np.ndarray,
        *,
        tolerance_s: float = 1e-4,
        size: int | tuple[int, int] | None = None,
        episode_index: int | None = None,
    ) -> np.ndarray:
        """The frames nearest to `timestamps` (seconds in the file), checked against LeRobot's tolerance.

        Raises `FrameTimestampError` naming the file, the episode and the offending timestamps when a
        requested timestamp has no decoded frame closer than `tolerance_s`. Returns (N, H, W, 3) uint8.
        Only the requested frames are converted to RGB (the frames between them are only decoded).
        """
        query = np.asarray(timestamps, dtype=np.float64)
        self._ensure_open()
        # Decode one frame period past the last timestamp, so that a timestamp that misses the tolerance has
        # a nearest frame to name in the error. The window starts at the first timestamp, so that reading
        # consecutive frames continues the decode instead of seeking back for every frame.
        period = 1.0 / self._fallback_fps
        frames, times = self._decode_window(float(query.min()) - tolerance_s, float(query.max()) + period, tolerance_s)
        nearest = match_timestamps(
            query, np.asarray(times, dtype=np.float64), tolerance_s=tolerance_s, path=self.path,
            episode_index=episode_index,
        )
        return self._to_rgb([frames[i] for i in nearest], [times[i] for i in nearest], size)

    def read_all(self, *, size: int | tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every frame of the file in order: (frames (N, H, W, 3) uint8, times (N,) float64)."""
        self._seek(0.0)
        return self.read_between(-1.0, float("inf"), size=size)


def match_timestamps(
    query: np.ndarray,
    loaded: np.ndarray,
    *,
    tolerance_s: float,
    path: str,
    episode_index: int | None = None,
) -> np.ndarray:
    """Index of the nearest loaded timestamp for every query, LeRobot's check: |query - nearest| < tolerance_s.

    `loaded` must be sorted. Raises `FrameTimestampError` listing the violations.
    """
    query = np.asarray(query, dtype=np.float64)
    if len(loaded) == 0:
        raise FrameTimestampError(
            path,
            episode_index=episode_index,
            violations=[(float(q), float("nan")) for q in query],
            tolerance_s=tolerance_s,
        )
    right = np.clip(np.searchsorted(loaded, query), 0, len(loaded) - 1)
    left = np.clip(right - 1, 0, len(loaded) - 1)
    use_left = np.abs(loaded[left] - query) <= np.abs(loaded[right] - query)
    nearest = np.where(use_left, left, right)
    distance = np.abs(loaded[nearest] - query)
    bad = distance >= tolerance_s
    if bad.any():
        raise FrameTimestampError(
            path,
            episode_index=episode_index,
            violations=[(float(q), float(loaded[n])) for q, n in zip(query[bad], nearest[bad])],
            tolerance_s=tolerance_s,
        )
    return nearest


class VideoEncoder:
    """Appends RGB frames to one video file, block after block (LeRobot v3.0 stores many episodes per mp4).

    Frame i of the file gets pts i in a 1/fps time base, so its timestamp is exactly i / fps and an episode
    written as frames [a, b) lives in [a / fps, b / fps) of the file.

    Args:
        path: output file; the container format follows the extension (.mp4, .webm, .avi, ...).
        fps: frame rate (an int for LeRobot datasets).
        width, height: frame size; yuv420p needs both even.
        codec: FFmpeg encoder name, default "libx264" (H.264).
        pix_fmt: "yuv420p" (default, plays everywhere) or "yuv444p" (no chroma subsampling).
        crf: constant rate factor (quality; 0 is lossless in YUV for libx264, 23 is x264's default).
        keyframe_interval: maximum frames between keyframes (GOP size); None means 2 * fps.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fps: int | float,
        width: int,
        height: int,
        codec: str = "libx264",
        pix_fmt: str = "yuv420p",
        crf: int | None = 23,
        keyframe_interval: int | None = None,
        extra_options: dict[str, str] | None = None,
    ):
        if pix_fmt in ("yuv420p", "yuvj420p", "nv12") and (width % 2 or height % 2):
            raise ValueError(
                f"{path}: pix_fmt {pix_fmt!r} needs an even width and height, got {width}x{height}; "
                "crop or pad the frames, or use pix_fmt='yuv444p'."
            )
        if codec not in av.codecs_available:
            raise ValueError(f"{path}: codec {codec!r} is not available in this FFmpeg build")
        self.path = str(path)
        self.fps = fps
        self.width, self.height = width, height
        self.codec, self.pix_fmt, self.crf = codec, pix_fmt, crf
        self.keyframe_interval = keyframe_interval if keyframe_interval is not None else max(1, int(round(2 * fps)))
        options = {"g": str(self.keyframe_interval)}
        if crf is not None and codec in _CRF_CODECS:
            options["crf"] = str(crf)
            if codec == "libvpx-vp9":
                options["b"] = "0"  # constant quality mode of libvpx needs a zero target bitrate
        if codec in _FORCED_IDR_CODECS:
            options["forced-idr"] = "1"
        options.update(extra_options or {})
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._time_base = Fraction(1, 1) / Fraction(fps).limit_denominator(1001)
        self._container = av.open(self.path, mode="w")
        self._stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = pix_fmt
        self._stream.time_base = self._time_base
        self.frames_written = 0
        self._packets_muxed = 0
        self._bytes_muxed = 0
        self._closed = False

    def _mux(self, packets) -> None:
        for packet in packets:
            self._packets_muxed += 1
            self._bytes_muxed += packet.size
            self._container.mux(packet)

    def add_frames(self, frames: np.ndarray, *, keyframe_first: bool = True) -> tuple[int, int]:
        """Encodes frames (T, H, W, 3) uint8 after those already written; returns their [start, end) frame
        numbers in the file. The first one is forced to be a keyframe unless `keyframe_first=False`."""
        if self._closed:
            raise RuntimeError(f"{self.path}: the encoder is closed")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"{self.path}: expected uint8 frames of shape (T, {self.height}, {self.width}, 3), "
                f"got {frames.dtype} {frames.shape}"
            )
        start = self.frames_written
        for offset, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = start + offset
            frame.time_base = self._time_base
            if keyframe_first and offset == 0:
                frame.pict_type = av.video.frame.PictureType.I
            self._mux(self._stream.encode(frame))
        self.frames_written = start + len(frames)
        return start, self.frames_written

    @property
    def estimated_size_bytes(self) -> float:
        """Estimated file size once the frames written so far are flushed.

        The encoder holds back frames (x264's lookahead) and the muxer buffers its output, so the bytes on
        disk lag behind; the bytes of the packets produced so far, scaled to all frames written, do not.
        """
        if self._packets_muxed == 0:
            return 0.0
        return self._bytes_muxed / self._packets_muxed * self.frames_written

    def close(self) -> None:
        """Flushes the encoder and writes the container index; the file is readable only after this."""
        if self._closed:
            return
        self._mux(self._stream.encode())
        self._container.close()
        self._closed = True

    def __enter__(self) -> VideoEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_video(
    path: str | Path,
    frames: np.ndarray,
    *,
    fps: int | float,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    crf: int | None = 23,
    keyframe_interval: int | None = None,
) -> None:
    """Writes frames (T, H, W, 3) uint8 to one video file."""
    frames = np.asarray(frames)
    with VideoEncoder(
        path,
        fps=fps,
        width=frames.shape[2],
        height=frames.shape[1],
        codec=codec,
        pix_fmt=pix_fmt,
        crf=crf,
        keyframe_interval=keyframe_interval,
    ) as encoder:
        encoder.add_frames(frames)


def decode_video(path: str | Path, *, size: int | tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of a file in order: (frames (N, H, W, 3) uint8, times (N,) float64 seconds)."""
    with VideoFrameReader(path) as reader:
        return reader.read_all(size=size)

"""PyAV encoding and decoding: timestamps, keyframes, codec tolerance, resizing, errors naming the file."""

import av
import numpy as np
import pytest

from data_fixtures import best_matching_frame, mean_abs_error, synthetic_frames
from training.data import FrameTimestampError, VideoDecodeError, VideoEncoder, VideoFrameReader, probe_video
from training.data.video import count_video_packets, decode_video, encode_video


def test_blocks_get_exact_timestamps_and_a_keyframe_each(tmp_path):
    path = tmp_path / "shared.mp4"
    blocks = [synthetic_frames(7, seed=0), synthetic_frames(5, seed=1), synthetic_frames(9, seed=2)]
    with VideoEncoder(path, fps=10, width=48, height=32, keyframe_interval=100) as encoder:
        ranges = [encoder.add_frames(block) for block in blocks]
    assert ranges == [(0, 7), (7, 12), (12, 21)]

    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    assert [round(frame.time, 6) for frame in decoded] == [round(i / 10, 6) for i in range(21)]
    keyframes = [i for i, frame in enumerate(decoded) if frame.key_frame]
    assert keyframes == [0, 7, 12]  # the interval (100) would give none after 0: these are the forced ones

    info = probe_video(path)
    assert (info.fps, info.width, info.height, info.num_frames, info.codec) == (10.0, 48, 32, 21, "h264")
    assert info.duration_s == pytest.approx(2.1)


def test_lossy_roundtrip_keeps_every_frame_recognisable(tmp_path):
    frames = synthetic_frames(20, seed=3)
    encode_video(tmp_path / "a.mp4", frames, fps=15, crf=23)
    decoded, times = decode_video(tmp_path / "a.mp4")
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    np.testing.assert_allclose(times, np.arange(20) / 15, atol=1e-6)
    assert mean_abs_error(decoded, frames) < 8
    assert [best_matching_frame(frame, frames) for frame in decoded] == list(range(20))


def test_yuv444_crf0_is_nearly_lossless(tmp_path):
    frames = synthetic_frames(6, seed=4)
    encode_video(tmp_path / "a.mp4", frames, fps=10, crf=0, pix_fmt="yuv444p")
    decoded, _ = decode_video(tmp_path / "a.mp4")
    # Only the RGB <-> YUV conversion rounds.
    assert np.abs(decoded.astype(int) - frames.astype(int)).max() <= 3


def test_reader_continues_forward_and_seeks_back(tmp_path):
    frames = synthetic_frames(40, seed=5)
    encode_video(tmp_path / "a.mp4", frames, fps=10, keyframe_interval=8)
    with VideoFrameReader(tmp_path / "a.mp4") as reader:
        middle, times = reader.read_between(1.3, 2.5)
        np.testing.assert_allclose(times, np.arange(13, 25) / 10)
        following, _ = reader.read_between(2.5, 2.8)  # continues from the pending frame
        earlier = reader.read_at([0.5, 3.9, 0.1])  # seeks back, any order
    assert [best_matching_frame(f, frames) for f in middle] == list(range(13, 25))
    assert [best_matching_frame(f, frames) for f in following] == [25, 26, 27]
    assert [best_matching_frame(f, frames) for f in earlier] == [5, 39, 1]


def test_consecutive_requests_decode_on_without_seeking(tmp_path, monkeypatch):
    frames = synthetic_frames(30, seed=6)
    encode_video(tmp_path / "a.mp4", frames, fps=10, keyframe_interval=10)
    reader = VideoFrameReader(tmp_path / "a.mp4")
    seeks = []
    real_seek = reader._seek
    monkeypatch.setattr(reader, "_seek", lambda time_s: (seeks.append(time_s), real_seek(time_s)))
    got = [reader.read_at([t / 10])[0] for t in range(3, 25)]  # frame by frame, like map-style items
    got += list(reader.read_between(2.5, 3.0)[0])  # then a range right after
    assert [best_matching_frame(f, frames) for f in got] == list(range(3, 30))
    assert seeks == [pytest.approx(0.3 - 1e-4)]  # one seek, at the first request
    reader.read_at([0.2])
    assert len(seeks) == 2  # going back needs a seek
    reader.close()


def test_read_at_enforces_tolerance_and_names_file_and_episode(tmp_path):
    encode_video(tmp_path / "a.mp4", synthetic_frames(10), fps=10)
    with VideoFrameReader(tmp_path / "a.mp4") as reader:
        assert reader.read_at([0.3 + 5e-5], tolerance_s=1e-4).shape == (1, 32, 48, 3)
        with pytest.raises(FrameTimestampError) as caught:
            reader.read_at([0.35], tolerance_s=1e-4, episode_index=7)
        with pytest.raises(FrameTimestampError, match="1.000000s"):
            reader.read_at([1.0])  # one frame past the end
    message = str(caught.value)
    assert "a.mp4" in message and "episode 7" in message and "0.350000" in message


def test_resize_while_decoding(tmp_path):
    encode_video(tmp_path / "a.mp4", synthetic_frames(4), fps=10)
    square, _ = decode_video(tmp_path / "a.mp4", size=16)
    rectangle, _ = decode_video(tmp_path / "a.mp4", size=(8, 24))
    assert square.shape == (4, 16, 16, 3) and rectangle.shape == (4, 8, 24, 3)


@pytest.mark.parametrize(("suffix", "codec"), [(".webm", "libvpx-vp9"), (".avi", "mpeg4")])
def test_other_containers(tmp_path, suffix, codec):
    frames = synthetic_frames(6)
    encode_video(tmp_path / f"a{suffix}", frames, fps=12, codec=codec)
    decoded, _ = decode_video(tmp_path / f"a{suffix}")
    assert len(decoded) == 6 and count_video_packets(tmp_path / f"a{suffix}") == 6
    assert probe_video(tmp_path / f"a{suffix}").fps == pytest.approx(12)


def test_unreadable_files_raise_video_decode_error(tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(VideoDecodeError, match="garbage.mp4"):
        probe_video(tmp_path / "garbage.mp4")
    with pytest.raises(VideoDecodeError, match="file not found"):
        probe_video(tmp_path / "missing.mp4")
    encode_video(tmp_path / "whole.mp4", synthetic_frames(30), fps=10)
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        probe_video(tmp_path / "truncated.mp4")


def test_encoder_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        VideoEncoder(tmp_path / "a.mp4", fps=10, width=31, height=32)
    with VideoEncoder(tmp_path / "b.mp4", fps=10, width=48, height=32) as encoder:
        with pytest.raises(ValueError, match=r"\(T, 32, 48, 3\)"):
            encoder.add_frames(np.zeros((2, 30, 48, 3), np.uint8))
        encoder.add_frames(synthetic_frames(2))

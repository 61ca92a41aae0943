"""Atomic, chunk-streamed mp4 writing (imageio-ffmpeg) and frame conversion."""

import os

import numpy as np
import pytest
import torch

from raven_video.utils.video_io import AtomicVideoWriter, save_video, to_uint8_frames


def _count_frames(path):
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return len(frames), frames[0].shape


def _gradient_frames(num_frames, height=32, width=48):
    t = np.linspace(0, 1, num_frames)[:, None, None, None]
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    return np.concatenate([t + 0 * x * y, y + 0 * t * x, x + 0 * t * y], axis=-1).astype(np.float32)


def test_to_uint8_frames_layouts_and_ranges():
    frames = _gradient_frames(5)  # [F, H, W, 3] in [0, 1]
    expected = np.round(frames * 255).astype(np.uint8)
    assert np.array_equal(to_uint8_frames(frames), expected)
    fchw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    assert np.array_equal(to_uint8_frames(fchw), expected)
    cfhw = torch.from_numpy(frames * 2 - 1).permute(3, 0, 1, 2).to(torch.bfloat16)
    converted = to_uint8_frames(cfhw, value_range=(-1, 1), layout="CFHW")
    assert converted.shape == (5, 32, 48, 3) and np.abs(converted.astype(int) - expected).max() <= 2
    assert to_uint8_frames(expected[0]).shape == (1, 32, 48, 3)  # one [H, W, 3] frame
    assert to_uint8_frames(np.full((1, 2, 2, 3), 7.0)).max() == 255  # clipped

    with pytest.raises(ValueError, match="ambiguous"):
        to_uint8_frames(np.zeros((2, 3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="4-D"):
        to_uint8_frames(np.zeros((1, 3, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(np.full((1, 2, 2, 3), np.nan, np.float32))
    with pytest.raises(TypeError, match="uint8"):
        to_uint8_frames(np.zeros((1, 2, 2, 3), np.int64))


def test_streamed_writer_produces_readable_mp4(tmp_path):
    path = tmp_path / "video.mp4"
    frames = _gradient_frames(21)
    with AtomicVideoWriter(path, fps=16) as writer:
        writer.append(frames[:9])  # first chunk: 9 frames, then chunks of 12 (uint8 this time)
        writer.append(to_uint8_frames(frames[9:]))
        assert not path.exists()  # published only on clean exit
    assert writer.num_frames == 21
    count, shape = _count_frames(path)
    assert count == 21 and shape == (32, 48, 3)
    assert os.listdir(tmp_path) == ["video.mp4"]

    # save_video overwrites atomically, with a crf setting and the VAE's [-1, 1] range
    save_video(torch.from_numpy(frames[:5] * 2 - 1), path, fps=8, value_range=(-1, 1), crf=18)
    assert _count_frames(path)[0] == 5


def test_exception_mid_write_leaves_no_file(tmp_path):
    path = tmp_path / "failed.mp4"
    with pytest.raises(RuntimeError, match="generation failed"):
        with AtomicVideoWriter(path) as writer:
            writer.append(_gradient_frames(4))
            raise RuntimeError("generation failed")
    assert os.listdir(tmp_path) == []

    # an existing video is kept when the replacement fails
    save_video(_gradient_frames(3), path)
    with pytest.raises(ValueError, match="Frame size changed"):
        with AtomicVideoWriter(path) as writer:
            writer.append(_gradient_frames(2))
            writer.append(_gradient_frames(2, height=16))
    assert os.listdir(tmp_path) == ["failed.mp4"] and _count_frames(path)[0] == 3

    with pytest.raises(ValueError, match="No frames"):
        with AtomicVideoWriter(tmp_path / "empty.mp4"):
            pass
    assert os.listdir(tmp_path) == ["failed.mp4"]


def test_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AtomicVideoWriter(tmp_path / "missing_dir" / "v.mp4")
    with pytest.raises(ValueError, match="not both"):
        AtomicVideoWriter(tmp_path / "v.mp4", quality=5, crf=20)
    with pytest.raises(ValueError, match="extension"):
        AtomicVideoWriter(tmp_path / "video")
    with pytest.raises(RuntimeError, match="inside"):
        AtomicVideoWriter(tmp_path / "v.mp4").append(_gradient_frames(1))

# Copyright 2026 The RAVEN-video authors. Apache-2.0.
"""Video writing that streams frames chunk by chunk and never leaves a partial file behind.

Encoding goes through imageio-ffmpeg (`imageio_ffmpeg.write_frames`, H.264 / yuv420p by default, the same encoder
diffusers' `export_to_video` uses). [`AtomicVideoWriter`] writes to a hidden temporary file in the destination folder
and renames it onto the final path only when the `with` block exits cleanly, so an interrupted or failed generation
leaves no truncated mp4.

Frame layouts accepted by [`to_uint8_frames`] (F = frames, C = 3 channels):
- `"FHWC"`: `[F, H, W, 3]` (numpy / imageio / `WanPipeline(output_type="np")[0]` layout),
- `"FCHW"`: `[F, 3, H, W]` (torchvision layout),
- `"CFHW"`: `[3, F, H, W]` (one sample of the VAE output `[B, 3, F, H, W]`),
- a single frame `[H, W, 3]` (FHWC with F = 1).
`layout="auto"` picks FHWC when the last dim is 3, else FCHW when dim 1 is 3; give the layout explicitly when both
hold or for CFHW.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


__all__ = ["AtomicVideoWriter", "frame_strip", "save_video", "to_uint8_frames"]

_LAYOUTS = ("auto", "FHWC", "FCHW", "CFHW")


def _to_numpy(frames: Any) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        torch = None
    if torch is not None and torch.is_tensor(frames):
        frames = frames.detach()
        if frames.is_floating_point() and frames.dtype != torch.float64:
            frames = frames.float()  # bf16 / fp16 -> fp32 (numpy has no bf16)
        return frames.cpu().numpy()
    if isinstance(frames, (list, tuple)):
        return np.stack([_to_numpy(f) for f in frames])
    if hasattr(frames, "convert") and hasattr(frames, "size"):  # a PIL image
        return np.asarray(frames.convert("RGB"))
    return np.asarray(frames)


def to_uint8_frames(
    frames: Any, value_range: tuple[float, float] = (0.0, 1.0), layout: str = "auto"
) -> np.ndarray:
    r"""
    Convert video frames to a C-contiguous `uint8` array `[F, H, W, 3]`.

    Args:
        frames (`torch.Tensor`, `np.ndarray`, or a list of frames / PIL images):
            uint8 values are used as they are; floating values are clipped to `value_range` and mapped linearly to
            0..255 with rounding. Layouts: see the module docstring.
        value_range (`tuple[float, float]`, defaults to `(0, 1)`): range of floating inputs; `(-1, 1)` for raw VAE
            output (`vae.decode(...)` / [`StreamingWanDecoder.decode_chunk`]).
        layout (`str`, defaults to `"auto"`): one of `"auto"`, `"FHWC"`, `"FCHW"`, `"CFHW"`.

    Returns:
        `np.ndarray` of shape `[F, H, W, 3]`, dtype `uint8`.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; use one of {_LAYOUTS}.")
    array = _to_numpy(frames)
    if array.ndim == 3 and layout in ("auto", "FHWC") and array.shape[-1] == 3:
        array = array[None]  # one [H, W, 3] frame
    if array.ndim != 4:
        hint = " Pass one sample of a batch (`video[0]`)." if array.ndim == 5 else ""
        raise ValueError(
            f"Video frames must be 4-D ([F, H, W, 3], [F, 3, H, W] or [3, F, H, W]), got shape {array.shape}.{hint}"
        )
    if layout == "auto":
        last, second = array.shape[-1] == 3, array.shape[1] == 3
        if last and second:
            raise ValueError(
                f"Frames of shape {array.shape} are ambiguous (dim 1 and the last dim are both 3); pass "
                "`layout='FHWC'` or `layout='FCHW'`."
            )
        if not (last or second):
            raise ValueError(
                f"Frames of shape {array.shape} have no RGB axis of size 3 at dim 1 or the last dim; pass RGB frames "
                "as [F, H, W, 3] or [F, 3, H, W], or give `layout='CFHW'` for [3, F, H, W]."
            )
        layout = "FHWC" if last else "FCHW"
    if layout == "FCHW":
        array = array.transpose(0, 2, 3, 1)
    elif layout == "CFHW":
        array = array.transpose(1, 2, 3, 0)
    if array.shape[-1] != 3:
        raise ValueError(f"Frames must have 3 (RGB) channels for layout {layout!r}, got shape {array.shape}.")
    if array.shape[0] == 0:
        raise ValueError("No frames to write (F = 0).")

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}.")
        if not np.isfinite(array).all():
            raise ValueError("Frames contain NaN or infinite values; the generation diverged (check the dtype).")
        scaled = (np.clip(array, low, high) - low) * (255.0 / (high - low))
        return np.ascontiguousarray(np.round(scaled).astype(np.uint8))
    raise TypeError(
        f"Frames must be uint8 or floating point, got dtype {array.dtype}. Convert integer frames to uint8 first."
    )


_TMP_MARK = ".tmp-"  # temporary files: .<stem>.tmp-<pid>-XXXX<suffix>


class AtomicVideoWriter:
    r"""
    Context manager that encodes frames as they arrive and publishes the video atomically.

    Frames go through ffmpeg (imageio-ffmpeg) into `.<name>.tmp-<pid>-XXXX<suffix>` in the destination folder; on a
    clean exit the file is renamed onto `path` (replacing an existing file), on any exception ffmpeg is stopped and
    the temporary file deleted, so `path` is either the complete video or untouched. A process killed outright
    (`kill -9`) cannot clean up: [`cleanup_partial_files`] removes such leftovers later (their process is gone).

    Args:
        path (`str` or `os.PathLike`): destination, e.g. `out/video.mp4`. Its folder must exist.
        fps (`float`, defaults to 16): frame rate (Wan2.1 generates 16 fps).
        quality (`float`, *optional*, defaults to 5 when `crf` is not given): imageio-ffmpeg quality 1..10
            (10 = best); ignored when `crf` is given.
        crf (`int`, *optional*): x264 constant rate factor 0..51 (lower = better, ~18 is visually lossless).
        codec (`str`, defaults to `"libx264"`); pix_fmt (`str`, defaults to `"yuv420p"`, plays everywhere).
        macro_block_size (`int`, defaults to 16): ffmpeg upsizes frames whose sides are not multiples of it (with a
            warning), like diffusers' `export_to_video`; 2 is the minimum for yuv420p.
        value_range, layout: passed to [`to_uint8_frames`] for every `append`.

    Example:

    ```py
    with AtomicVideoWriter("out.mp4", fps=16, value_range=(-1, 1), layout="CFHW") as writer:
        for chunk in pipe.stream(prompt):  # each [3, F, H, W] in [-1, 1]
            writer.append(chunk)
    ```
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 16,
        quality: float | None = None,
        crf: int | None = None,
        codec: str = "libx264",
        pix_fmt: str = "yuv420p",
        macro_block_size: int = 16,
        value_range: tuple[float, float] = (0.0, 1.0),
        layout: str = "auto",
    ):
        self.path = Path(path)
        if not self.path.parent.exists():
            raise FileNotFoundError(
                f"Cannot write {self.path}: folder {self.path.parent} does not exist. Create it first "
                "(e.g. `--output_dir` is created by generate.py)."
            )
        if self.path.is_dir():
            raise IsADirectoryError(f"Video path {self.path} is a directory; pass a file name such as video.mp4.")
        if not self.path.suffix:
            raise ValueError(
                f"Video path {self.path} has no extension; use e.g. `.mp4` so ffmpeg knows the container."
            )
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}.")
        if quality is not None and crf is not None:
            raise ValueError("Give either `quality` (1..10) or `crf` (0..51), not both.")
        if quality is not None and not 1 <= quality <= 10:
            raise ValueError(f"quality must be within 1..10 (10 = best), got {quality}.")
        if crf is not None and not 0 <= int(crf) <= 51:
            raise ValueError(f"crf must be within 0..51 (lower = better), got {crf}.")
        if layout not in _LAYOUTS:
            raise ValueError(f"Unknown layout {layout!r}; use one of {_LAYOUTS}.")
        self.fps = fps
        self.quality = 5.0 if (quality is None and crf is None) else quality
        self.crf = crf
        self.codec = codec
        self.pix_fmt = pix_fmt
        self.macro_block_size = macro_block_size
        self.value_range = value_range
        self.layout = layout
        self.num_frames = 0
        self._size: tuple[int, int] | None = None  # (width, height)
        self._writer = None
        self._tmp_path: Path | None = None
        self._open = False

    # ------------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "AtomicVideoWriter":
        if self._open or self._tmp_path is not None:
            raise RuntimeError("An AtomicVideoWriter can be used for one video only; create a new one.")
        prefix = f".{self.path.stem}{_TMP_MARK}{os.getpid()}-"
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=self.path.suffix, dir=self.path.parent)
        os.close(fd)
        self._tmp_path = Path(tmp)
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _start(self, width: int, height: int) -> None:
        import imageio_ffmpeg

        output_params = ["-crf", str(int(self.crf))] if self.crf is not None else None
        self._writer = imageio_ffmpeg.write_frames(
            str(self._tmp_path),
            (width, height),
            fps=self.fps,
            quality=None if self.crf is not None else self.quality,
            codec=self.codec,
            pix_fmt_out=self.pix_fmt,
            macro_block_size=self.macro_block_size,
            output_params=output_params,
        )
        self._writer.send(None)  # start ffmpeg
        self._size = (width, height)

    def append(self, frames: Any) -> None:
        r"""
        Encode more frames.

        Args:
            frames: `[F, H, W, 3]` uint8 or float frames (other layouts / ranges as configured, see
                [`to_uint8_frames`]); every call must use the same H and W.
        """
        if not self._open:
            raise RuntimeError("AtomicVideoWriter.append() must be called inside `with AtomicVideoWriter(...) as w:`.")
        array = to_uint8_frames(frames, value_range=self.value_range, layout=self.layout)
        height, width = array.shape[1:3]
        if self._writer is None:
            self._start(width, height)
        elif (width, height) != self._size:
            raise ValueError(
                f"Frame size changed within one video: got {height}x{width} (HxW), the video is "
                f"{self._size[1]}x{self._size[0]}."
            )
        for frame in array:
            self._writer.send(frame)
        self.num_frames += array.shape[0]

    def close(self) -> None:
        """Finish encoding and move the video onto `path`. Called by a clean `with` exit."""
        if not self._open:
            return
        try:
            if self._writer is None:
                raise ValueError(f"No frames were appended; {self.path} was not written.")
            self._writer.close()  # flushes and waits for ffmpeg
            self._writer = None
            if not self._tmp_path.exists() or self._tmp_path.stat().st_size == 0:
                raise RuntimeError(f"ffmpeg produced no output for {self.path}; see its messages above.")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
            os.replace(self._tmp_path, self.path)
            self._open = False
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop ffmpeg and delete the temporary file; `path` is left untouched. Called on an exception."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                # A BaseException thrown into imageio-ffmpeg's generator makes it kill ffmpeg instead of waiting for
                # it to finish encoding; plain `close()` would wait.
                writer.throw(_AbortEncoding())
            except _AbortEncoding:
                pass
            except Exception:  # noqa: BLE001 - ffmpeg errors while aborting are irrelevant
                pass
            finally:
                writer.close()
        if self._tmp_path is not None and self._tmp_path.exists():
            self._tmp_path.unlink()
        self._open = False


class _AbortEncoding(BaseException):
    """Raised inside imageio-ffmpeg's frame generator to stop ffmpeg immediately."""


def save_video(
    frames: Any,
    path: str | os.PathLike,
    fps: float = 16,
    value_range: tuple[float, float] = (0.0, 1.0),
    layout: str = "auto",
    **writer_kwargs,
) -> Path:
    r"""
    Write a whole video atomically (see [`AtomicVideoWriter`] for `writer_kwargs`: `quality`, `crf`, `codec`, ...).

    Args:
        frames: `[F, H, W, 3]` uint8 or float in `value_range` (other layouts: see [`to_uint8_frames`]).
        path: destination file, e.g. `video.mp4`.
        fps: frame rate.

    Returns:
        `Path` of the written file.
    """
    with AtomicVideoWriter(path, fps=fps, value_range=value_range, layout=layout, **writer_kwargs) as writer:
        writer.append(frames)
    return Path(path)


def frame_strip(videos: Any, path: str | os.PathLike | None = None, count: int = 9,
                value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    r"""
    A contact sheet: ``count`` evenly spaced frames of each video side by side, one row per video, optionally
    written as a PNG (atomically).

    Args:
        videos: one video ``[F, H, W, 3]`` or several ``[N, F, H, W, 3]`` (uint8, or float in ``value_range``).
        path: where to write the PNG; ``None`` only returns the image.

    Returns:
        uint8 ``[N * H, count * W, 3]``.
    """
    from PIL import Image

    videos = np.asarray(videos)
    videos = videos[None] if videos.ndim == 4 else videos
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"frame_strip takes [F, H, W, 3] or [N, F, H, W, 3] frames, got shape {videos.shape}.")
    rows = []
    for video in videos:
        video = to_uint8_frames(video, value_range=value_range, layout="FHWC")
        pick = np.linspace(0, video.shape[0] - 1, num=min(count, video.shape[0])).round().astype(int)
        rows.append(np.concatenate(list(video[pick]), axis=1))
    image = np.concatenate(rows, axis=0)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    return image


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode an mp4 -> ``(uint8 [F, H, W, 3], fps)`` with imageio-ffmpeg (its wheel ships ffmpeg)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    if not frames:
        raise ValueError(f"{path}: no frames decoded; the file is empty or not a video.")
    return np.stack(frames), float(meta.get("fps", 16.0))


def cleanup_partial_files(folder: str | os.PathLike) -> int:
    """Remove the temporary files of [`AtomicVideoWriter`] that killed runs left in ``folder``; returns how many.

    A temporary file names its writer's process id; files of processes that still run (another generation writing
    into the same folder) are kept.
    """
    removed = 0
    for tmp in Path(folder).glob(f".*{_TMP_MARK}*"):
        owner = tmp.name.rsplit(_TMP_MARK, 1)[1].split("-", 1)[0]
        if owner.isdigit() and _process_alive(int(owner)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True

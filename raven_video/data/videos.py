"""Video files as training data: a source listing, clip reading, and a map-style dataset of clips.

A *video source* is a CSV / JSONL with ``video`` (path) and ``prompt`` columns, or a folder where ``clip.mp4`` has its
prompt in ``clip.txt``. Clips are the first ``num_frames`` frames, resized (short side) and centre-cropped to
``height`` x ``width``, as ``float32 [3, F, H, W]`` in [-1, 1] (the layout diffusers video VAEs take).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["VIDEO_EXTS", "list_videos", "read_clip", "VideoFolderDataset"]

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


def list_videos(source: str) -> list[tuple[str, str]]:
    """``[(video_path, prompt)]`` of a video source (module docstring)."""
    if os.path.isdir(source):
        items = []
        for name in sorted(os.listdir(source)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTS:
                txt = os.path.join(source, stem + ".txt")
                if not os.path.isfile(txt):
                    raise FileNotFoundError(f"{name} has no prompt file {stem}.txt next to it.")
                with open(txt, encoding="utf-8") as handle:
                    items.append((os.path.join(source, name), handle.read().strip()))
        return items
    if not os.path.isfile(source):
        raise FileNotFoundError(f"video source {source!r} is neither a folder nor a CSV/JSONL file.")
    base = os.path.dirname(os.path.abspath(source))
    with open(source, encoding="utf-8") as handle:
        if source.endswith(".jsonl"):
            rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = list(csv.DictReader(handle))
    if rows and not {"video", "prompt"} <= set(rows[0]):
        raise ValueError(f"{source} needs 'video' and 'prompt' columns, found {sorted(rows[0])}.")
    return [(r["video"] if os.path.isabs(r["video"]) else os.path.join(base, r["video"]), r["prompt"]) for r in rows]


def read_clip(path: str, num_frames: int, height: int, width: int) -> torch.Tensor | None:
    """``[3, F, H, W]`` in [-1, 1], or ``None`` if the video has fewer than ``num_frames`` frames."""
    import imageio.v3 as iio

    frames = []
    for frame in iio.imiter(path):
        frames.append(frame[..., :3])
        if len(frames) == num_frames:
            break
    if len(frames) < num_frames:
        return None
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [F, 3, h, w]
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return video[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3).clamp(-1, 1)


class VideoFolderDataset(Dataset):
    """The clips of a video source (videos shorter than ``num_frames`` are dropped when listed).

    Items: ``{"video": float32 [3, F, H, W] in [-1, 1], "prompt": str}``.
    """

    def __init__(self, source: str, num_frames: int, height: int, width: int):
        self.items = list_videos(source)
        if not self.items:
            raise ValueError(f"video source {source!r} lists no video.")
        self.num_frames, self.height, self.width = num_frames, height, width

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, prompt = self.items[index]
        clip = read_clip(path, self.num_frames, self.height, self.width)
        if clip is None:
            raise ValueError(f"{path} has fewer than {self.num_frames} frames; drop it from the source or lower "
                             "--num_frames.")
        return {"video": clip, "prompt": prompt}

"""Pixel-clip data of the scripts that train on videos rather than latents (``train_vae.py``,
``train_preview_decoder.py``): the procedural world (a new clip per item, deterministic per seed) or a folder of clips.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from ..data.videos import VideoFolderDataset
from ..world.data import WorldClipDataset

__all__ = ["add_clip_arguments", "check_clip_args", "training_clips", "validation_clips", "clip_batches"]


def add_clip_arguments(p, num_frames: int = 9) -> None:
    p.add_argument("--videos", type=str, default=None,
                   help="CSV/JSONL (video, prompt) or a folder of clips; None: the procedural world.")
    p.add_argument("--world_max_objects", type=int, default=3)
    p.add_argument("--num_frames", type=int, default=num_frames, help="Frames per training clip (4k+1 for stride 4).")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--train_batch_size", type=int, default=8, help="Clips per process per step.")
    p.add_argument("--dataloader_num_workers", type=int, default=2)


def check_clip_args(args, temporal: int, spatial: int, frame_args=("num_frames",)) -> None:
    """Clip lengths ``temporal k + 1``, sizes multiples of ``spatial``, an existing ``--videos``: one-line errors."""
    if args.train_batch_size < 1:
        raise ValueError(f"--train_batch_size {args.train_batch_size} must be >= 1.")
    for name in frame_args:
        frames = getattr(args, name)
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(f"--{name} {frames} must be {temporal}k+1 (the VAE's temporal stride is {temporal}), "
                             f"e.g. {temporal + 1} or {4 * temporal + 1}.")
    for name in ("height", "width"):
        if getattr(args, name) % spatial:
            raise ValueError(f"--{name} {getattr(args, name)} must be a multiple of the spatial stride {spatial}.")
    if args.videos is not None and not os.path.exists(args.videos):
        raise FileNotFoundError(f"--videos {args.videos!r} does not exist.")


def training_clips(args, num_processes: int):
    """A map-style dataset of training clips: the world (one new clip per item, deterministic per seed) or a folder."""
    if args.videos is not None:
        return VideoFolderDataset(args.videos, args.num_frames, args.height, args.width)
    clips = args.max_train_steps * args.train_batch_size * num_processes
    return WorldClipDataset(clips, num_frames=args.num_frames, height=args.height, width=args.width,
                            max_objects=args.world_max_objects)


def validation_clips(args, num_clips: int, num_frames: int, start: int = 0) -> torch.Tensor:
    """Held-out clips ``[N, 3, F, H, W]``: evaluation seeds of the world, or the folder's last clips."""
    if args.videos is not None:
        data = VideoFolderDataset(args.videos, num_frames, args.height, args.width)
        return torch.stack([data[len(data) - 1 - i]["video"] for i in range(min(num_clips, len(data)))])
    data = WorldClipDataset(num_clips, split="heldout", evaluation=True, start=start, num_frames=num_frames,
                            height=args.height, width=args.width, max_objects=args.world_max_objects)
    return torch.stack([data[i]["video"] for i in range(num_clips)])


def clip_batches(dataset, args, accelerator, start_step: int):
    """Endless prepared batches from ``start_step`` on (epochs reshuffled with seeded generators; the world has one)."""
    step = start_step
    while True:
        loader = DataLoader(dataset, batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers,
                            shuffle=args.videos is not None, drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed + step // max(len(dataset), 1)))
        loader = accelerator.prepare(loader)
        per_epoch = len(loader)
        if per_epoch == 0:
            raise ValueError(f"{len(dataset)} clips make no batch of {args.train_batch_size}; lower "
                             "--train_batch_size.")
        skip = step % per_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            yield batch["video"]
            step += 1

#!/usr/bin/env python
"""Videos -> normalised Wan VAE latents + prompts: the ``--latent_dataset`` of ``train_teacher.py`` and of
``train_raven.py``'s teacher / diffusion forcing histories.

    python scripts/precompute_latents.py --videos clips.csv --vae Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --output_dir latents-81x480x832 --num_frames 81 --height 480 --width 832
    python scripts/precompute_latents.py --world 16384 --vae runs/world/vae --output_dir runs/world/latents \\
        --num_frames 81 --height 64 --width 64                  # the procedural world (training seeds)

``--videos``: a CSV/JSONL with ``video`` (path) and ``prompt`` columns, or a folder where ``clip.mp4`` has its prompt
in ``clip.txt`` (``raven_video.data.videos``): first ``--num_frames`` frames, resized and centre-cropped. ``--world N``:
N world clips of training seeds ``[--world_start, --world_start + N)``. Clips are encoded with ``AutoencoderKLWan``
(posterior mode) and normalised ``(z - latents_mean) / latents_std``, the latent space of the pipeline; output layout:
``raven_video/data/latents.py`` (sharded safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from diffusers import AutoencoderKLWan
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from raven_video.cli.training import load_vae as load_wan_vae
from raven_video.data.latents import normalize_latents, write_latent_shards
from raven_video.data.videos import list_videos, read_clip
from raven_video.testing import tiny_vae
from raven_video.world.data import WorldClipDataset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], fromfile_prefix_chars="@")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", help="CSV/JSONL with video,prompt columns, or a folder (clip.mp4 + clip.txt)")
    source.add_argument("--world", type=int, help="encode this many clips of the procedural world")
    p.add_argument("--world_start", type=int, default=0, help="first world training seed")
    p.add_argument("--vae", default=None, help="AutoencoderKLWan folder / Hub id (a pipeline: subfolder vae is tried)")
    p.add_argument("--tiny_random_vae", action="store_true", help="tiny random VAE (tests only)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (reading / rendering clips)")
    p.add_argument("--shard_size", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if (args.num_frames - 1) % 4:
        p.error(f"--num_frames {args.num_frames} must be 4k+1 (e.g. 81).")
    if not args.vae and not args.tiny_random_vae:
        p.error("pass --vae (a Wan2.1 VAE folder or a trained world VAE) or --tiny_random_vae.")
    if args.world is not None and args.world < 1:
        p.error(f"--world {args.world} must be >= 1.")
    return args


def load_vae(args) -> AutoencoderKLWan:
    return tiny_vae() if args.tiny_random_vae else load_wan_vae(args.vae)


class _VideoSource(Dataset):
    """Clips of a video source; a video that is too short gives ``None`` (skipped with a warning)."""

    def __init__(self, source, num_frames, height, width):
        self.items, self.size = list_videos(source), (num_frames, height, width)
        if not self.items:
            raise ValueError(f"--videos {source!r} lists no video.")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, prompt = self.items[index]
        return {"video": read_clip(path, *self.size), "prompt": prompt, "video_path": path}


def _collate(items):
    kept = [item for item in items if item["video"] is not None]
    for item in items:
        if item["video"] is None:
            print(f"skipping {item['video_path']}: fewer frames than --num_frames", file=sys.stderr)
    if not kept:
        return None
    rows = [{k: v for k, v in item.items() if k != "video"} for item in kept]
    return torch.stack([item["video"] for item in kept]), rows


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    if args.world is not None:
        data = WorldClipDataset(args.world, start=args.world_start, num_frames=args.num_frames, height=args.height,
                                width=args.width)
    else:
        data = _VideoSource(args.videos, args.num_frames, args.height, args.width)
    vae = load_vae(args).to(args.device).eval()
    spatial = vae.config.scale_factor_spatial
    if args.height % spatial or args.width % spatial:
        raise SystemExit(f"error: --height/--width {args.height}x{args.width} must be multiples of the VAE's spatial "
                         f"stride {spatial}.")
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=_collate)
    meta = {"num_frames": args.num_frames, "height": args.height, "width": args.width}

    def batches():
        for batch in tqdm(loader, desc="encoding"):
            if batch is None:
                continue
            video, rows = batch
            z = vae.encode(video.to(args.device, vae.dtype)).latent_dist.mode()
            yield normalize_latents(vae, z.float()).cpu(), [{**row, **meta} for row in rows]

    written = write_latent_shards(args.output_dir, batches(), args.shard_size)
    print(json.dumps({"written": written, "skipped": len(data) - written, "output_dir": args.output_dir}))
    return written


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Videos -> Wan VAE latents + prompts, the ``--latent_dataset`` of ``train_raven.py`` (teacher / diffusion forcing).

    python scripts/precompute_latents.py --videos clips.csv --vae Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        --output_dir latents-81x480x832 --num_frames 81 --height 480 --width 832

``--videos``: a CSV/JSONL with ``video`` (path) and ``prompt`` columns, or a folder of videos where ``clip.mp4`` has
its prompt in ``clip.txt``. Each video is read with imageio, its first ``--num_frames`` frames (4k+1) are resized
(short side) and center-cropped to ``--height`` x ``--width``, scaled to [-1, 1], encoded with
``AutoencoderKLWan`` (posterior mode) and normalised ``(z - latents_mean) / latents_std`` -- the latent space of the
pipeline. Output layout: see ``raven_video/data/latents.py``. Videos that are too short are skipped with a warning.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", required=True, help="CSV/JSONL with video,prompt columns, or a folder (clip.mp4+clip.txt)")
    p.add_argument("--vae", default=None, help="AutoencoderKLWan folder / Hub id (a pipeline: subfolder vae is tried)")
    p.add_argument("--tiny_random_vae", action="store_true", help="tiny random VAE (tests only)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if (args.num_frames - 1) % 4:
        p.error(f"--num_frames {args.num_frames} must be 4k+1 (e.g. 81).")
    if args.height % 16 or args.width % 16:
        p.error(f"--height/--width {args.height}x{args.width} must be multiples of 16.")
    if not args.vae and not args.tiny_random_vae:
        p.error("pass --vae (a Wan2.1 VAE) or --tiny_random_vae.")
    return args


def list_items(source: str) -> list:
    """``[(video_path, prompt)]``."""
    if os.path.isdir(source):
        items = []
        for name in sorted(os.listdir(source)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTS:
                txt = os.path.join(source, stem + ".txt")
                if not os.path.isfile(txt):
                    raise FileNotFoundError(f"{name} has no prompt file {stem}.txt next to it.")
                items.append((os.path.join(source, name), open(txt, encoding="utf-8").read().strip()))
        return items
    base = os.path.dirname(os.path.abspath(source))
    if source.endswith(".jsonl"):
        rows = [json.loads(line) for line in open(source, encoding="utf-8") if line.strip()]
    else:
        rows = list(csv.DictReader(open(source, encoding="utf-8")))
    if rows and not {"video", "prompt"} <= set(rows[0]):
        raise ValueError(f"{source} needs 'video' and 'prompt' columns, found {sorted(rows[0])}.")
    return [(r["video"] if os.path.isabs(r["video"]) else os.path.join(base, r["video"]), r["prompt"]) for r in rows]


def read_clip(path: str, num_frames: int, height: int, width: int) -> torch.Tensor | None:
    """``[3, F, H, W]`` in [-1, 1], or None if the video has fewer than ``num_frames`` frames."""
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


def load_vae(args):
    if args.tiny_random_vae:
        from raven_video.testing import tiny_vae

        return tiny_vae()
    from diffusers import AutoencoderKLWan

    try:
        return AutoencoderKLWan.from_pretrained(args.vae, subfolder="vae")
    except (OSError, EnvironmentError):
        return AutoencoderKLWan.from_pretrained(args.vae)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    from raven_video.data.latents import normalize_latents

    items = list_items(args.videos)
    if not items:
        raise ValueError(f"--videos {args.videos!r} lists no video.")
    vae = load_vae(args).to(args.device).eval()
    os.makedirs(args.output_dir, exist_ok=True)
    written = 0
    with open(os.path.join(args.output_dir, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for path, prompt in items:
            clip = read_clip(path, args.num_frames, args.height, args.width)
            if clip is None:
                print(f"skipping {path}: fewer than {args.num_frames} frames", file=sys.stderr)
                continue
            z = vae.encode(clip[None].to(args.device, vae.dtype)).latent_dist.mode()
            latents = normalize_latents(vae, z.float())[0].cpu()
            name = f"{written:06d}.pt"
            torch.save({"latents": latents}, os.path.join(args.output_dir, name))
            meta.write(json.dumps({"file": name, "prompt": prompt, "video": path, "num_frames": args.num_frames,
                                   "height": args.height, "width": args.width}) + "\n")
            written += 1
    print(json.dumps({"written": written, "skipped": len(items) - written, "output_dir": args.output_dir}))
    return written


if __name__ == "__main__":
    main()

"""Sampling helpers shared by the VBench harness and the reward eval.

The pipeline is duck-typed: any object with
``pipe(prompt=list[str], num_frames=int, height=int, width=int, generator=list[torch.Generator], output_type="np",
**kwargs).frames`` returning float ``[B, F, H, W, 3]`` in [0, 1] (diffusers ``WanPipeline`` convention) works.
"""

from __future__ import annotations

import importlib
import os
from typing import List, Sequence

import numpy as np
import torch

__all__ = ["call_pipeline", "load_pipeline", "SyntheticVideoPipeline"]


def call_pipeline(pipe, prompts: Sequence[str], seeds: Sequence[int], num_frames: int, height: int, width: int,
                  generator_device: str = "cpu", **kwargs) -> np.ndarray:
    """Run ``pipe`` on a batch with one seeded generator per video; returns float ``[B, F, H, W, 3]`` in [0, 1]."""
    generators = [torch.Generator(device=generator_device).manual_seed(int(s)) for s in seeds]
    out = pipe(prompt=list(prompts), num_frames=num_frames, height=height, width=width, generator=generators,
               output_type="np", **kwargs)
    frames = getattr(out, "frames", out)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[0] != len(prompts) or frames.shape[-1] != 3:
        raise ValueError(
            f"pipeline returned frames of shape {frames.shape}; expected [B={len(prompts)}, F, H, W, 3] "
            "(call it with output_type='np')"
        )
    return frames


def load_pipeline(spec: str, device: str = "cuda", dtype: str = "bfloat16"):
    """Build a pipeline from ``spec``:

    * ``"synthetic"`` - :class:`SyntheticVideoPipeline` (weight-free smoke tests);
    * ``"tiny"`` - the tiny random :class:`~raven_video.CausalWanPipeline` (real code path, noise output);
    * ``"module.path:function"`` - ``function()`` must return a pipeline;
    * a local folder / Hub id - ``CausalWanPipeline.from_pretrained`` (VAE kept in fp32).
    """
    if spec == "synthetic":
        return SyntheticVideoPipeline()
    if ":" in spec and not os.path.exists(spec):
        module, func = spec.split(":", 1)
        return getattr(importlib.import_module(module), func)()
    if spec == "tiny":
        from raven_video.testing import tiny_pipeline

        return tiny_pipeline().to(device)
    from raven_video import CausalWanPipeline

    pipe = CausalWanPipeline.from_pretrained(spec, dtype=getattr(torch, dtype))
    pipe.vae.to(torch.float32)
    return pipe.to(device)


class SyntheticVideoPipeline:
    """Weight-free stand-in with the pipeline call signature: a smooth random texture panned at a seed-dependent
    speed (0-3 px/frame). For smoke-testing the harness and CLI without model weights."""

    def __init__(self, max_speed: float = 3.0):
        self.max_speed = float(max_speed)

    def __call__(self, prompt: List[str], num_frames: int = 81, height: int = 480, width: int = 832,
                 generator=None, output_type: str = "np", **kwargs):
        if output_type != "np":
            raise ValueError("SyntheticVideoPipeline only supports output_type='np'")
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * len(prompt)
        videos = []
        for g in gens:
            g = g if g is not None else torch.Generator().manual_seed(0)
            speed = float(torch.rand((), generator=g)) * self.max_speed
            span = int(width + speed * num_frames + 2)
            yy = torch.linspace(0, 1, height).view(-1, 1)
            xx = torch.linspace(0, span / width, span).view(1, -1)
            tex = torch.zeros(3, height, span)
            for c in range(3):
                for _ in range(4):
                    fx, fy, ph = (torch.rand(3, generator=g) * torch.tensor([12.0, 12.0, 6.28])).tolist()
                    tex[c] += torch.sin(fx * 6.28 * xx + fy * 6.28 * yy + ph)
            tex = (tex - tex.min()) / (tex.max() - tex.min() + 1e-6)
            frames = []
            for t in range(num_frames):
                x0 = speed * t
                i0 = int(x0)
                a = x0 - i0
                frame = (1 - a) * tex[:, :, i0 : i0 + width] + a * tex[:, :, i0 + 1 : i0 + 1 + width]
                frames.append(frame.permute(1, 2, 0))
            videos.append(torch.stack(frames))
        return _Output(torch.stack(videos).numpy())


class _Output:
    def __init__(self, frames: np.ndarray):
        self.frames = frames

"""Evaluate models of the world against its ground truth (``scripts/evaluate_world.py``, ``docs/world.md``).

One protocol for every row of the report, on held-out prompt combinations and evaluation seeds
(``split="heldout"``, seeds from ``HELDOUT_SEED_OFFSET``): the video of seed ``s`` starts from noise drawn by
``torch.Generator().manual_seed(s)`` and is scored against its own prompt by
:func:`~raven_video.world.metrics.score_video` (per 81-frame window), plus a Fréchet distance of clip-encoder
features against the rendered clips of the same seeds.

* ``reference``: the rendered clips themselves (the ceiling of every metric);
* ``reconstruction``: those clips through the VAE (encode, decode): the ceiling of any model in its latent space;
* ``teacher``: a bidirectional teacher, Euler PF-ODE with classifier-free guidance (the upper reference);
* ``student``: a causal few-step pipeline at 1x, 2x and 4x the training length (81 frames), the longer ones with a
  sliding attention window and a sink (LongLive style), reported per window so drift shows.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..data.latents import normalize_latents
from ..pipelines.vae_streaming import decode_videos
from ..utils.video_io import frame_strip, to_uint8_frames
from .data import frames_to_tensor, world_seeds
from .captions import BACKGROUNDS, COLOURS, SHAPES
from .metrics import score_video
from .render import prompt_for_seed, render_clip

__all__ = ["EvalSet", "heldout_set", "reference_videos", "reconstructed_videos", "student_videos", "teacher_videos",
           "score", "TRAINING_FRAMES", "frames_for_length", "WORD_KINDS", "swap_words", "word_swap_gaps"]

TRAINING_FRAMES = 81


def frames_for_length(multiple: int, training_frames: int = TRAINING_FRAMES, chunk: int = 3) -> int:
    """Pixel frames of ``multiple`` times the training length in whole chunks: 81 (21 latent frames) -> 165, 333."""
    latent = ((training_frames - 1) // 4 + 1) * multiple
    latent -= latent % chunk
    return 4 * (latent - 1) + 1


@dataclass(frozen=True)
class EvalSet:
    """Seeds and prompts of an evaluation (``split`` ``heldout``: prompt combinations never trained on)."""

    seeds: tuple[int, ...]
    prompts: tuple[str, ...]
    split: str = "heldout"


def heldout_set(num_prompts: int, split: str = "heldout", start: int = 0) -> EvalSet:
    seeds = tuple(world_seeds(num_prompts, evaluation=True, start=start))
    return EvalSet(seeds, tuple(prompt_for_seed(s, split) for s in seeds), split)


def reference_videos(evalset: EvalSet, num_frames: int = TRAINING_FRAMES) -> list[np.ndarray]:
    """The rendered ground-truth clips, uint8 ``[F, 64, 64, 3]``."""
    return [render_clip(seed, num_frames=num_frames, split=evalset.split).frames for seed in evalset.seeds]


@torch.no_grad()
def reconstructed_videos(vae, videos: list[np.ndarray], batch_size: int = 8, preview=None) -> list[np.ndarray]:
    """``videos`` through the VAE (posterior mode, decode); with ``preview`` (a ``TAEHVDecoder``), decoded by it
    from the normalised latents instead: the ceiling of what a stream shown through the preview can score."""
    out = []
    device = next(vae.parameters()).device
    for start in range(0, len(videos), batch_size):
        clips = torch.stack([frames_to_tensor(v) for v in videos[start:start + batch_size]]).to(device, vae.dtype)
        z = vae.encode(clips).latent_dist.mode()
        decoded = vae.decode(z).sample if preview is None else preview.decode(normalize_latents(vae, z))
        decoded = decoded.float().clamp(-1, 1)
        out.extend(to_uint8_frames(v, value_range=(-1, 1), layout="CFHW") for v in decoded.cpu())
    return out


WORD_KINDS = {"shape": SHAPES, "colour": tuple(COLOURS), "direction": ("left", "right", "up", "down"),
              "background": tuple(BACKGROUNDS)}


def swap_words(prompt: str, kind: str) -> str:
    """``prompt`` with every word of one kind (:data:`WORD_KINDS`) replaced by the next of that kind (cyclically):
    *a red circle moves left* -> *a red square moves left* for ``"shape"``."""
    words = WORD_KINDS[kind]
    return re.sub(r"\b(" + "|".join(words) + r")\b", lambda m: words[(words.index(m.group(1)) + 1) % len(words)], prompt)


@torch.no_grad()
def word_swap_gaps(pipe, evalset: EvalSet, sigmas=(0.5, 0.8, 0.95), seed: int = 0, batch_size: int = 16) -> dict:
    """How much a model reads each kind of word of its prompt: the flow-matching loss (Eq. 1) on the rendered clips'
    latents with each caption's words of one kind swapped (:func:`swap_words`), minus the loss with the true
    caption, at each ``sigma`` (same noise), as a fraction of the true loss. About 0 means the model ignores that
    kind of word: a teacher that renders colours and backgrounds but draws no prompted shape or direction shows
    gaps near 0 for ``shape`` and ``direction`` long before its samples are scored. Also ``"empty"``: the empty
    prompt instead. Bidirectional (teacher) forward; returns ``{kind: mean gap, f"{kind}@{sigma}": gap}``."""
    from ..data.latents import normalize_latents
    from ..sampling.flow import add_noise, velocity_target

    device, dtype = pipe._execution_device, pipe.transformer.dtype
    generator = torch.Generator().manual_seed(seed)
    kinds = {"true": lambda p: p, **{k: (lambda p, k=k: swap_words(p, k)) for k in WORD_KINDS}, "empty": lambda p: ""}
    sums = {(kind, sigma): 0.0 for kind in kinds for sigma in sigmas}
    videos = reference_videos(evalset)
    encode = dict(do_classifier_free_guidance=False, num_videos_per_prompt=1,
                  max_sequence_length=pipe.config.max_sequence_length, device=device)
    for start in range(0, len(videos), batch_size):
        clips = torch.stack([frames_to_tensor(v) for v in videos[start:start + batch_size]]).to(device, pipe.vae.dtype)
        x0 = normalize_latents(pipe.vae, pipe.vae.encode(clips).latent_dist.mode().float())
        prompts = evalset.prompts[start:start + batch_size]
        texts = {kind: pipe.encode_prompt(prompt=[f(p) for p in prompts], **encode)[0].to(dtype) for kind, f in kinds.items()}
        for sigma in sigmas:
            noise = torch.randn(x0.shape, generator=generator).to(device)
            x_t = add_noise(x0, noise, sigma).to(dtype)
            t = torch.full((len(prompts),), sigma * 1000.0, device=device)
            for kind, text in texts.items():
                v = pipe.transformer(x_t, t, text).sample.float()
                sums[kind, sigma] += float(((v - velocity_target(noise, x0)) ** 2).mean()) * len(prompts)
    out = {}
    for kind in kinds:
        if kind == "true":
            continue
        gaps = [(sums[kind, s] - sums["true", s]) / sums["true", s] for s in sigmas]
        out.update({f"{kind}@{s}": g for s, g in zip(sigmas, gaps)}, **{kind: float(np.mean(gaps))})
    return out


def _noise(seeds, shape, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


@torch.no_grad()
def student_videos(pipe, evalset: EvalSet, num_frames: int = TRAINING_FRAMES, batch_size: int = 16,
                   local_attn_size: int | None = None, sink_size: int | None = None,
                   guidance_scale: float | None = None) -> list[np.ndarray]:
    """A causal few-step pipeline's videos (uint8) of the set's prompts, initial noise seeded by each seed;
    ``guidance_scale`` > 1: the student's own CFG against the empty prompt (a negative branch per step); ``None``: the
    pipeline's default (its config's ``guidance_scale``)."""
    device = pipe._execution_device
    latent_frames = pipe.latent_frames(num_frames)
    s = pipe.vae_scale_factor_spatial
    shape = (pipe.transformer.config.in_channels, latent_frames, pipe.config.height // s, pipe.config.width // s)
    videos = []
    for start in range(0, len(evalset.seeds), batch_size):
        seeds = evalset.seeds[start:start + batch_size]
        frames = pipe(prompt=list(evalset.prompts[start:start + batch_size]), num_frames=num_frames,
                      latents=_noise(seeds, shape, device),
                      generator=[torch.Generator().manual_seed(seed + 1) for seed in seeds],
                      local_attn_size=local_attn_size, sink_size=sink_size, guidance_scale=guidance_scale,
                      output_type="np").frames
        videos.extend(to_uint8_frames(v) for v in frames)
    return videos


@torch.no_grad()
def teacher_videos(pipe, evalset: EvalSet, num_steps: int = 48, guidance_scale: float = 3.0,
                   negative_prompt: str = "", shift: float | None = None, batch_size: int = 16,
                   num_frames: int = TRAINING_FRAMES) -> list[np.ndarray]:
    """A bidirectional teacher's videos: Euler PF-ODE, ``num_steps`` on the shifted grid, CFG against
    ``negative_prompt`` (the empty prompt for a teacher trained with condition dropout)."""
    from ..sampling.flow import DEFAULT_SHIFT
    from ..training.ode import teacher_trajectory

    device = pipe._execution_device
    transformer = pipe.transformer
    s = pipe.vae_scale_factor_spatial
    shape = (transformer.config.in_channels, pipe.latent_frames(num_frames), pipe.config.height // s,
             pipe.config.width // s)
    encode_kwargs = dict(do_classifier_free_guidance=False, num_videos_per_prompt=1,
                         max_sequence_length=pipe.config.max_sequence_length, device=device)
    negative, _ = pipe.encode_prompt(prompt=[negative_prompt], **encode_kwargs)
    videos = []
    for start in range(0, len(evalset.seeds), batch_size):
        seeds = evalset.seeds[start:start + batch_size]
        text, _ = pipe.encode_prompt(prompt=list(evalset.prompts[start:start + batch_size]), **encode_kwargs)
        latents = teacher_trajectory(transformer, text, _noise(seeds, shape, device), pipe.config.denoising_timesteps,
                                     num_steps=num_steps, kind="bidirectional", guidance_scale=guidance_scale,
                                     negative_text=negative.expand(len(seeds), -1, -1),
                                     shift=DEFAULT_SHIFT if shift is None else shift).endpoints
        decoded = decode_videos(pipe.vae, latents.to(pipe.vae.dtype), batch_size=len(seeds))
        videos.extend(to_uint8_frames(v, value_range=(-1, 1), layout="FCHW") for v in decoded)
    return videos


def _score_one(item):
    video, prompt = item
    result = score_video(video, prompt, window=TRAINING_FRAMES, caption_frames=TRAINING_FRAMES)
    return result.summary, result.windows


def score(videos: list[np.ndarray], evalset: EvalSet, encoder=None, reference: list[np.ndarray] | None = None,
          workers: int | None = None, strip: str | None = None) -> dict[str, float]:
    """Mean world scores of ``videos`` against the set's prompts (summary keys, and ``window{i}/<key>`` per
    81-frame window), plus ``frechet`` (the first 81 frames vs ``reference``) and ``frechet_last_window`` (the last
    81 frames: drift) when an ``encoder`` is given; ``strip``: write a PNG of the first 4 videos there."""
    from .features import clip_frechet_distance

    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    items = list(zip(videos, evalset.prompts))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_score_one, items, chunksize=4))
    else:
        results = [_score_one(item) for item in items]
    collected: dict[str, list[float]] = {}
    for summary, windows in results:
        for key, value in summary.items():
            collected.setdefault(key, []).append(value)
        for index, window in enumerate(windows):
            for key, value in window.items():
                collected.setdefault(f"window{index}/{key}", []).append(value)
    out = {key: float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
           for key, values in collected.items()}
    if encoder is not None and reference is not None:
        out["frechet"] = clip_frechet_distance(encoder, [v[:TRAINING_FRAMES] for v in videos], reference)
        if len(videos[0]) > TRAINING_FRAMES:
            out["frechet_last_window"] = clip_frechet_distance(encoder, [v[-TRAINING_FRAMES:] for v in videos],
                                                               reference)
    if strip is not None:
        frame_strip(np.stack(videos[:4]), strip)
    return out

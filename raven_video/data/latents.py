"""Precomputed VAE-latent datasets (real videos) for the ``teacher_forcing`` / ``diffusion_forcing`` history modes.

Layout written by ``scripts/precompute_latents.py`` (one folder)::

    metadata.jsonl      one JSON object per line: {"file": "000000.pt", "prompt": "...", "num_frames": 81, ...}
    000000.pt           torch.save({"latents": Tensor[C, F, H, W] (normalised like the pipeline's latents)})

Latents are *normalised* the way ``CausalWanPipeline`` produces them: ``(z - latents_mean) / latents_std`` of the
Wan VAE (``WanPipeline`` decodes ``z = latents * std + mean``), so they live in the same space as the student's
rollout endpoints.
"""

from __future__ import annotations

import json
import os
from typing import List, Sequence

import torch


__all__ = ["LatentDataset", "normalize_latents", "denormalize_latents"]


def _stats(vae, like: torch.Tensor):
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents ``[B, C, F, H, W]`` -> the transformer's latent space ``(z - mean) / std``."""
    mean, std = _stats(vae, z)
    return (z - mean) / std


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, latents)
    return latents * std + mean


class LatentDataset:
    """A folder of precomputed latents + prompts (see module docstring).

    Args:
        root: the folder.
        latent_shape: expected ``(C, F, H, W)``; every item is checked on load with a clear error.
    """

    def __init__(self, root: str, latent_shape: Sequence[int] | None = None):
        meta = os.path.join(root, "metadata.jsonl")
        if not os.path.isfile(meta):
            raise FileNotFoundError(
                f"--latent_dataset {root!r} has no metadata.jsonl; build it with scripts/precompute_latents.py."
            )
        with open(meta, encoding="utf-8") as fh:
            self.items = [json.loads(line) for line in fh if line.strip()]
        if not self.items:
            raise ValueError(f"--latent_dataset {root!r} lists no latents in metadata.jsonl.")
        for item in self.items:
            if not str(item.get("prompt", "")).strip() or "file" not in item:
                raise ValueError(f"--latent_dataset {root!r}: entry {item} needs a non-empty 'prompt' and a 'file'.")
        self.root = root
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def keys(self) -> List[str]:
        """One string key per item (``str(index)``), usable as the "prompts" of a :class:`PromptStream`."""
        return [str(i) for i in range(len(self.items))]

    def prompt(self, key: str) -> str:
        return str(self.items[int(key)]["prompt"]).strip()

    def latents(self, key: str) -> torch.Tensor:
        item = self.items[int(key)]
        path = os.path.join(self.root, item["file"])
        latents = torch.load(path, map_location="cpu", weights_only=True)["latents"].float()
        if self.latent_shape is not None and tuple(latents.shape) != self.latent_shape:
            raise ValueError(
                f"latents {path!r} have shape {tuple(latents.shape)} but training expects {self.latent_shape} "
                "(C, F, H, W). Re-run scripts/precompute_latents.py with the same --num_frames/--height/--width."
            )
        return latents

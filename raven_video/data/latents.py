"""Precomputed VAE-latent datasets: the data of ``train_teacher.py`` and of the ``teacher_forcing`` /
``diffusion_forcing`` history modes of ``train_raven.py``.

Layout written by ``scripts/precompute_latents.py`` (one folder)::

    metadata.jsonl          one JSON object per line: {"file": "shard-00000.safetensors", "index": 3, "prompt": ...}
    shard-00000.safetensors {"latents": Tensor[N, C, F, H, W]} (float16; item = row ``index``)

(older folders hold one ``000000.pt`` per item, ``{"latents": Tensor[C, F, H, W]}``, read with
``torch.load(weights_only=True)``; an entry without ``index`` is such a file).

Latents are *normalised* the way ``CausalWanPipeline`` produces them: ``(z - latents_mean) / latents_std`` of the
Wan VAE (``WanPipeline`` decodes ``z = latents * std + mean``), so they live in the same space as the student's
rollout endpoints.
"""

from __future__ import annotations

import json
import os
from typing import List, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file


__all__ = ["LatentDataset", "LatentParts", "normalize_latents", "write_latent_shards"]


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
        """``[C, F, H, W]`` float32 latents of one item."""
        item = self.items[int(key)]
        path = os.path.join(self.root, item["file"])
        if "index" in item:
            with safe_open(path, framework="pt") as shard:
                latents = shard.get_slice("latents")[int(item["index"])].float()
        else:
            latents = torch.load(path, map_location="cpu", weights_only=True)["latents"].float()
        self._check(latents, path)
        return latents

    def all_latents(self) -> torch.Tensor:
        """Every item's latents as one ``[N, C, F, H, W]`` float16 tensor, in item order (shards read once)."""
        out, shards = [], {}
        for key in self.keys:
            item = self.items[int(key)]
            if "index" not in item:
                out.append(self.latents(key).half())
                continue
            if item["file"] not in shards:
                with safe_open(os.path.join(self.root, item["file"]), framework="pt") as shard:
                    shards[item["file"]] = shard.get_tensor("latents")
            out.append(shards[item["file"]][int(item["index"])].half())
        latents = torch.stack(out)
        self._check(latents[0], self.root)
        return latents

    def _check(self, latents: torch.Tensor, path: str) -> None:
        if self.latent_shape is not None and tuple(latents.shape) != self.latent_shape:
            raise ValueError(
                f"latents {path!r} have shape {tuple(latents.shape)} but training expects {self.latent_shape} "
                "(C, F, H, W). Re-run scripts/precompute_latents.py with the same --num_frames/--height/--width."
            )


def write_latent_shards(folder: str, batches, shard_size: int = 1024) -> int:
    """Write ``(latents [n, C, F, H, W], rows)`` batches (``rows``: one metadata dict per item, with ``prompt``) as the
    sharded layout of the module docstring; ``metadata.jsonl`` is written last, atomically. Returns the item count."""
    os.makedirs(folder, exist_ok=True)
    pending, rows, written, shard = [], [], 0, 0

    def flush():
        nonlocal pending, shard
        if pending:
            save_file({"latents": torch.cat(pending).half().contiguous()},
                      os.path.join(folder, f"shard-{shard:05d}.safetensors"))
            pending, shard = [], shard + 1

    for latents, batch_rows in batches:
        for i, row in enumerate(batch_rows):
            if sum(p.shape[0] for p in pending) == shard_size:
                flush()
            pending.append(latents[i : i + 1].cpu())
            rows.append({**row, "file": f"shard-{shard:05d}.safetensors",
                         "index": sum(p.shape[0] for p in pending) - 1})
            written += 1
    flush()
    tmp = os.path.join(folder, "metadata.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, os.path.join(folder, "metadata.jsonl"))
    return written


class LatentParts:
    """A folder of ``part-<i>`` sub-folders, each a :class:`LatentDataset` written in one go (a part is complete once
    its ``metadata.jsonl`` exists, which :func:`write_latent_shards` writes last): the resumable store of
    ``train_ode_init.py``'s teacher trajectories (items ``[K + 1, C, F, H, W]``: the states at the student's ``K``
    timesteps, then the endpoint). Items are numbered across parts in part order."""

    def __init__(self, root: str):
        self.root = root

    def part_dir(self, index: int) -> str:
        return os.path.join(self.root, f"part-{index:05d}")

    def is_complete(self, index: int) -> bool:
        return os.path.isfile(os.path.join(self.part_dir(index), "metadata.jsonl"))

    def load(self, num_parts: int, item_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, List[str]]:
        """Every item of parts ``0 .. num_parts - 1`` as one ``[N, ...]`` float16 tensor, and their prompts."""
        missing = [i for i in range(num_parts) if not self.is_complete(i)]
        if missing:
            raise FileNotFoundError(f"{self.root!r}: parts {missing[:5]} are not complete; run the generation again "
                                    "(it resumes and writes only the missing parts).")
        datasets = [LatentDataset(self.part_dir(i), latent_shape=item_shape) for i in range(num_parts)]
        items = torch.cat([d.all_latents() for d in datasets])
        return items, [d.prompt(k) for d in datasets for k in d.keys]

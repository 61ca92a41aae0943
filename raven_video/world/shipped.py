"""The world model shipped inside the package: the default of ``generate.py`` and of :func:`pretrained`.

Shipped now: ``weights/vae`` (the world's trained ``AutoencoderKLWan``, the first stage of ``configs/world/``; its
``metrics.json`` holds how it was trained and what it scores) and ``weights/clip_encoder`` (the clip encoder of the
world's Fréchet distance). Planned: ``weights/pipeline``, a ``CausalWanPipeline`` folder of the final RAVEN + CM-GRPO
student with that VAE, the frozen text encoder and the word-level tokenizer (not trained yet: ``docs/world.md``,
"Status"). All safetensors; loading imports no code from the folders.
"""

from __future__ import annotations

import os

__all__ = ["WEIGHTS_DIR", "pretrained_path", "pretrained", "vae_path", "default_encoder_dir"]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def pretrained_path() -> str:
    """The shipped pipeline folder; a clear error if this installation lacks it."""
    path = os.path.join(WEIGHTS_DIR, "pipeline")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no trained world pipeline is shipped yet ({path!r} is missing; docs/world.md, "
                                "\"Status\"): train one with scripts/world_recipe.py, or pass a pipeline folder / Hub id.")
    return path


def vae_path() -> str:
    """The shipped world VAE (``AutoencoderKLWan`` folder): ``scripts/world_recipe.py --vae`` skips the VAE stage."""
    path = os.path.join(WEIGHTS_DIR, "vae")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the shipped world VAE is missing from {path!r}: reinstall raven-video from a full "
                                "checkout (the weights are package data).")
    return path


def pretrained(device: str | None = None, dtype=None):
    """The shipped world model as a ``CausalWanPipeline`` (64x64, 16 fps, 4 steps per chunk), e.g.
    ``pretrained()("a red circle moves right quickly, on a black background").frames[0]``."""
    from ..pipelines.pipeline_causal_wan import CausalWanPipeline

    pipe = CausalWanPipeline.from_pretrained(pretrained_path(), **({"dtype": dtype} if dtype is not None else {}))
    return pipe.to(device) if device is not None else pipe


def default_encoder_dir() -> str | None:
    """The shipped clip encoder of the Fréchet distance, or ``None`` if absent."""
    path = os.path.join(WEIGHTS_DIR, "clip_encoder")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None

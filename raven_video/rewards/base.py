"""Common interface of every reward in :mod:`raven_video.rewards`.

Video layout (one convention for all rewards)
---------------------------------------------
``videos``: ``torch.Tensor`` of shape ``[B, F, C, H, W]`` with ``C == 3`` (RGB), either

* floating point in ``[-1, 1]`` (what the VAE decodes to; converted to uint8 with ``round((x + 1) * 127.5)``
  exactly as RAVEN's ``base_reward_model.py`` does, docs/rewards_eval.md), or
* ``torch.uint8`` in ``[0, 255]``.

A numpy pipeline output ``[B, F, H, W, 3]`` float in ``[0, 1]`` (diffusers ``output_type="np"``) is converted with
:func:`videos_from_numpy`. Every reward quantises to uint8 first, so float and uint8 inputs give identical scores.

Output
------
``reward(videos, prompts=None, fps=16.0)`` returns ``dict[str, torch.Tensor]``: one float32 tensor of shape ``[B]``
per named field, on the CPU. No gradients flow (rewards run under ``torch.inference_mode``).

Weights
-------
Models are built lazily on first use (or by ``.load()``) from a local file / folder or an explicit Hub reference
``"owner/repo/path/in/repo.pth"`` given by the user. Nothing is ever downloaded implicitly; ``random_init=True``
builds the real architecture with random weights (tests, speed/memory benchmarks).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

VideoBatch = Union[torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------------
def to_uint8_videos(videos: VideoBatch, min_frames: int = 1, name: str = "reward") -> torch.Tensor:
    """Validate a video batch and quantise it to uint8.

    Args:
        videos: ``[B, F, 3, H, W]`` float in [-1, 1] or uint8 (see module docstring).
        min_frames: smallest admissible ``F`` (temporal rewards need 2 or more).
        name: reward name used in error messages.

    Returns:
        ``torch.uint8`` tensor ``[B, F, 3, H, W]`` on the input's device.
    """
    if isinstance(videos, np.ndarray):
        raise TypeError(
            f"{name}: got a numpy array of shape {videos.shape}; rewards take a torch tensor [B, F, 3, H, W]. "
            "For a pipeline's output_type='np' frames ([B, F, H, W, 3] in [0, 1]) use "
            "raven_video.rewards.videos_from_numpy(frames)."
        )
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f"{name}: videos must be a torch.Tensor [B, F, 3, H, W], got {type(videos).__name__}")
    shape = tuple(videos.shape)
    if videos.ndim == 4 and shape[1] == 3:
        raise ValueError(
            f"{name}: got a 4-D tensor {shape}; expected a batch [B, F, 3, H, W]. "
            "For one video [F, 3, H, W] use videos[None]; for RAVEN's [3, F, H, W] use video.permute(1, 0, 2, 3)[None]."
        )
    if videos.ndim != 5:
        raise ValueError(f"{name}: expected videos of shape [B, F, 3, H, W], got {videos.ndim}-D tensor {shape}")
    if shape[2] != 3:
        hint = ""
        if shape[-1] == 3:
            hint = " It looks channels-last [B, F, H, W, 3]: use videos.permute(0, 1, 4, 2, 3)."
        elif shape[1] == 3:
            hint = " It looks like [B, 3, F, H, W]: use videos.permute(0, 2, 1, 3, 4)."
        raise ValueError(f"{name}: expected 3 RGB channels at dim 2 of [B, F, 3, H, W], got shape {shape}.{hint}")
    if shape[0] == 0:
        raise ValueError(f"{name}: empty batch (B = 0)")
    if shape[1] < min_frames:
        raise ValueError(
            f"{name}: needs at least {min_frames} frames per video, got F = {shape[1]} (shape {shape}); "
            "a temporal reward cannot score a single frame."
        )
    if videos.dtype == torch.uint8:
        return videos
    if not torch.is_floating_point(videos):
        raise TypeError(f"{name}: videos must be float in [-1, 1] or uint8, got dtype {videos.dtype}")
    lo, hi = float(videos.min()), float(videos.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(
            f"{name}: float videos must lie in [-1, 1], got min {lo:.3f}, max {hi:.3f}. "
            "Convert [0, 1] frames with 2 * x - 1, or pass uint8 [0, 255] frames."
        )
    # docs/rewards_eval.md: round((x + 1) * 127.5), clamp, uint8
    return ((videos.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def videos_from_numpy(frames: np.ndarray) -> torch.Tensor:
    """Pipeline ``output_type="np"`` frames ``[B, F, H, W, 3]`` (float in [0, 1] or uint8) -> uint8 ``[B, F, 3, H, W]``."""
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected numpy frames [B, F, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = np.clip(np.round(frames.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 1, 4, 2, 3).contiguous()


def check_prompts(prompts: Optional[Sequence[str]], batch_size: int, name: str) -> List[str]:
    if prompts is None:
        raise ValueError(f"{name}: this reward needs one text prompt per video (prompts=[...] of length {batch_size})")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise ValueError(f"{name}: got {len(prompts)} prompts for {batch_size} videos; pass one prompt per video")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------
_HUB_REF = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(.+))?$")


def resolve_checkpoint(spec: Union[str, os.PathLike], default_filename: Optional[str] = None, name: str = "") -> Path:
    """Resolve a user-given checkpoint reference to a local file or folder.

    * an existing local file -> itself; an existing folder -> ``folder/default_filename`` when that file exists,
      otherwise the folder;
    * ``"owner/repo/path/in/repo"`` or ``"hf://owner/repo/path"`` -> :func:`huggingface_hub.hf_hub_download` (an
      explicit request by the user; honours ``HF_HUB_OFFLINE`` and the local cache).
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if default_filename and (path / default_filename).is_file():
            return path / default_filename
        return path
    match = _HUB_REF.match(text)
    if match and not text.startswith((".", "/", "~")):
        repo_id, filename = match.group(1), match.group(2) or default_filename
        if filename is None:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id))
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise FileNotFoundError(
                f"{name}: {text!r} is not a local file and could not be fetched from the Hub as "
                f"repo {repo_id!r} file {filename!r} ({type(e).__name__}: {e}). Pass a local path instead."
            ) from e
    raise FileNotFoundError(
        f"{name}: checkpoint {text!r} does not exist. Pass a local file/folder or an explicit Hub reference "
        "'owner/repo/file.pth'."
    )


def torch_load(path: Union[str, os.PathLike], allow_pickle: bool = False):
    """Load a checkpoint on the CPU without running code from it.

    ``.safetensors`` files load with safetensors; anything else with ``torch.load(weights_only=True)`` (tensors,
    containers and plain numbers only). A file that also pickles Python objects is refused with an error naming the
    opt-in, unless ``allow_pickle=True`` (the ``--allow_pickle`` flag): unpickling runs code, so only for files you
    trust (a warning says so).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if allow_pickle:
        warnings.warn(f"unpickling {path} with weights_only=False (allow_pickle=True): this runs code stored in the "
                      "file; use it only for checkpoints you trust.", UserWarning, stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} pickles Python objects besides tensors, which loading would run. If you trust the file, opt in "
            "with allow_pickle=True (CLI: --allow_pickle); better, convert it to safetensors."
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------------------------
class VideoReward:
    """Base class: input validation, lazy model building, device handling, batching, no-grad.

    Subclasses set :attr:`name`, :attr:`fields`, :attr:`min_frames`, :attr:`needs_prompts` and implement
    :meth:`_build` (create ``self.model`` on ``self.device``; only for model-based rewards) and :meth:`_score`.
    """

    name: str = "reward"
    fields: tuple = ()
    min_frames: int = 1
    needs_prompts: bool = False

    def __init__(self, device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32,
                 allow_pickle: bool = False):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.allow_pickle = bool(allow_pickle)  # consent to unpickle this reward's checkpoint (see torch_load)
        self.model = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _set_weights(self, checkpoint, random_init: bool, model, expected: str, required: bool = True) -> None:
        """Remember where the weights come from (a checkpoint, random init, or a ready ``model``); with none given,
        raise naming the file to pass. ``required=False`` for modes that need no weights (weight-free backends)."""
        if required and checkpoint is None and not random_init and model is None:
            raise ValueError(
                f"{type(self).__name__}: pass checkpoint=<{expected}>, or random_init=True for random weights "
                "(tests/benchmarks)."
            )
        self.checkpoint = checkpoint
        self.model = model.to(self.device, self.dtype).eval() if model is not None else None

    @property
    def is_loaded(self) -> bool:
        return self.model is not None or not self._needs_model()

    def _needs_model(self) -> bool:
        return True

    def load(self) -> "VideoReward":
        """Build the model now (otherwise it is built on the first call)."""
        if self.model is None and self._needs_model():
            self._build()
        return self

    def _build(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def to(self, device: Union[str, torch.device]) -> "VideoReward":
        self.device = torch.device(device)
        if isinstance(self.model, torch.nn.Module):
            self.model.to(self.device)
        return self

    # -- scoring ---------------------------------------------------------------------------------------------
    def __call__(
        self, videos: VideoBatch, prompts: Optional[Sequence[str]] = None, fps: float = 16.0
    ) -> Dict[str, torch.Tensor]:
        """Score a batch. ``videos``: ``[B, F, 3, H, W]`` float in [-1, 1] or uint8; returns ``{field: [B]}``."""
        frames = to_uint8_videos(videos, min_frames=self.min_frames, name=self.name)
        if fps is None or fps <= 0:
            raise ValueError(f"{self.name}: fps must be a positive number, got {fps!r}")
        if self.needs_prompts:
            prompts = check_prompts(prompts, frames.shape[0], self.name)
        self.load()
        with torch.inference_mode():
            out = self._score(frames.to(self.device), prompts, float(fps))
        missing = set(self.fields) - set(out)
        if missing:  # pragma: no cover - programming error
            raise RuntimeError(f"{self.name}: _score did not return fields {sorted(missing)}")
        return {k: v.detach().float().cpu().reshape(frames.shape[0]) for k, v in out.items()}

    def _score(self, frames: torch.Tensor, prompts: Optional[List[str]], fps: float) -> Dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fields={self.fields}, device={self.device}, loaded={self.is_loaded})"


def pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Replicate-pad ``[N, C, H, W]`` so H, W are multiples of ``divisor``, centred ("sintel" mode of RAFT/AMT's
    ``InputPadder``: the extra row/column goes to the bottom/right)."""
    h, w = x.shape[-2:]
    pad_h = (((h // divisor) + 1) * divisor - h) % divisor
    pad_w = (((w // divisor) + 1) * divisor - w) % divisor
    if pad_h == 0 and pad_w == 0:
        return x
    return torch.nn.functional.pad(
        x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], mode="replicate"
    )


def unpad(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pad_to_multiple` for a tensor padded from size ``(h, w)``."""
    ph, pw = x.shape[-2] - h, x.shape[-1] - w
    return x[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]

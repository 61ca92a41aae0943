"""Exponential moving average of named parameters (docs/method.md §5: decay 0.9675).

RAVEN: ``theta_ema <- 0.9675 theta_ema + 0.0325 theta`` after every generator optimizer step, with a CONSTANT
decay from the first update and ``theta_ema`` initialised from the model's weights; CM-GRPO does the same on
the LoRA parameters only.

Written by hand rather than wrapping ``diffusers.training_utils.EMAModel`` because (1) EMAModel's decay is
``min(decay, (1 + step) / (10 + step))`` with a copy (decay 0) on the first step, so a constant 0.9675 needs
``min_decay=decay`` plus ``update_after_step=-1``; (2) it matches shadow tensors to parameters by position,
whereas here a LoRA subset is addressed by name and a checkpoint records those names; (3) importing
``diffusers.training_utils`` pulls in the UNet/PEFT/transformers stack just for an average.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Union

import torch


__all__ = ["EMA"]

NameFilter = Union[None, Iterable[str], Callable[[str, torch.nn.Parameter], bool]]


def _select(model: torch.nn.Module, names: NameFilter):
    """``(name, param)`` pairs to track: a list of names, a predicate, or (default) ``requires_grad`` params."""
    params = dict(model.named_parameters())
    if names is None:
        return [(n, p) for n, p in params.items() if p.requires_grad]
    if callable(names):
        return [(n, p) for n, p in params.items() if names(n, p)]
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"EMA parameter names not found in the model: {missing[:5]} (of {len(missing)} missing).")
    return [(n, params[n]) for n in names]


class EMA:
    """EMA of a set of named parameters of a module, checkpointable with Accelerate.

    ``accelerator.register_for_checkpointing(ema)`` works: the object has ``state_dict`` /
    ``load_state_dict``. Shadow tensors are float32 copies on the parameters' device (or ``device``).

    Args:
        model: the module whose parameters are averaged (unwrap DDP first; names must match at update time).
        decay: constant decay (RAVEN 0.9675).
        names: which parameters: ``None`` = all with ``requires_grad`` (e.g. only LoRA params when the base is
            frozen), a list of names, or a predicate ``(name, param) -> bool``.
        device: where to keep the shadow copies (e.g. ``"cpu"`` to save accelerator memory).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.9675,
        names: NameFilter = None,
        device: Optional[Union[str, torch.device]] = None,
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay} (RAVEN uses 0.9675).")
        selected = _select(model, names)
        if not selected:
            raise ValueError("EMA has no parameters to track: none selected (are all parameters frozen?).")
        self.decay = float(decay)
        self.device = device
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            n: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for n, p in selected
        }

    @property
    def names(self):
        return list(self.shadow)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """``shadow <- decay * shadow + (1 - decay) * param`` for every tracked name."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            if name not in params:
                raise KeyError(f"EMA parameter {name!r} missing from the model; pass the unwrapped model.")
            shadow.lerp_(params[name].detach().to(shadow.device, torch.float32), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (in each parameter's dtype/device)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            if name not in params:
                raise KeyError(f"EMA parameter {name!r} missing from the model.")
            params[name].copy_(shadow.to(params[name].device, params[name].dtype))

    def state_dict(self) -> dict:
        """Full (unsharded) tensors: Accelerate calls this on every rank and writes the main process's copy, so
        FSDP2-sharded shadows (DTensors) are gathered here (a collective) rather than saving rank 0's shard only."""
        shadow = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in self.shadow.items()}
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state_dict: dict) -> None:
        shadow = state_dict["shadow"]
        if set(shadow) != set(self.shadow):
            only_ckpt = sorted(set(shadow) - set(self.shadow))[:5]
            only_here = sorted(set(self.shadow) - set(shadow))[:5]
            raise ValueError(
                f"EMA checkpoint tracks different parameters: only in checkpoint {only_ckpt}, only here "
                f"{only_here}. Build the EMA with the same `names` (same LoRA config) as the saved run."
            )
        for name, value in shadow.items():
            target = self.shadow[name]
            if hasattr(target, "device_mesh"):  # FSDP2 shard: take this rank's part of the full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(target.device, torch.float32), target.device_mesh, target.placements)
            if value.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA shape mismatch for {name!r}: checkpoint {tuple(value.shape)} vs "
                    f"{tuple(self.shadow[name].shape)}."
                )
            self.shadow[name].copy_(value.to(self.shadow[name].device, torch.float32))
        self.decay = float(state_dict.get("decay", self.decay))
        self.num_updates = int(state_dict.get("num_updates", 0))

"""Reading original-format transformer checkpoints and converting them into diffusers model folders.

:func:`load_original_checkpoint` reads ``.pt`` / ``.safetensors`` files without running code from them
(``torch.load(weights_only=True)``), descends into training containers and strips wrapper prefixes;
:func:`convert_checkpoint` renames the keys (:mod:`raven_video.models.conversion`), builds the model on the meta device,
checks keys and shapes and writes the folder atomically. The command line is ``raven-convert``
(:mod:`raven_video.cli.convert`).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from ..utils.atomic import atomic_folder
from .conversion import (
    CHECKPOINT_CONTAINER_KEYS,
    CHECKPOINT_KEY_PREFIXES,
    WRAPPER_COMPONENTS,
    convert_original_wan_state_dict,
    detect_state_dict_layout,
    infer_wan_config_from_state_dict,
)
from .transformer_causal_wan import CausalWanTransformer3DModel

__all__ = ["Conversion", "convert_checkpoint", "load_original_checkpoint"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _describe(obj: Mapping) -> str:
    parts = []
    for k, v in list(obj.items())[:20]:
        kind = "tensor" if torch.is_tensor(v) else ("dict" if isinstance(v, Mapping) else type(v).__name__)
        parts.append(f"{k!r} ({kind})")
    more = f", ... ({len(obj) - 20} more)" if len(obj) > 20 else ""
    return "{" + ", ".join(parts) + more + "}"


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for wrapper in WRAPPER_COMPONENTS:
        if any(wrapper in k for k in state_dict):
            state_dict = {k.replace(wrapper, ""): v for k, v in state_dict.items()}
    changed = True
    while changed:
        changed = False
        for prefix in CHECKPOINT_KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def _select_flat_subset(state_dict: dict[str, torch.Tensor], key: str | None, path: Path) -> dict[str, torch.Tensor]:
    """A flat file (e.g. safetensors) holding several models under `<container>.` prefixes: keep one."""
    firsts = {k.split(".", 1)[0] for k in state_dict}
    containers = [c for c in CHECKPOINT_CONTAINER_KEYS if c in firsts]
    if key is not None:
        if key not in firsts:
            raise KeyError(
                f"Checkpoint {path} has no `{key}` weights; available containers: "
                f"{containers or 'none (a single model)'}. Pass one of them as `key` (`--key`), or no `key` for a "
                "single-model file."
            )
        return {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
    if len(firsts) > 1 and containers:
        chosen = containers[0]
        return {k[len(chosen) + 1 :]: v for k, v in state_dict.items() if k.startswith(chosen + ".")}
    return state_dict


def _read_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"Could not read {path} as safetensors ({type(err).__name__}: {err}). The file is truncated or not a "
                "safetensors file; re-download it or pass the original `.pt` checkpoint."
            ) from err
    if suffix in _TORCH_SUFFIXES:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - re-raised below with the path and the fix
            if _is_weights_only_error(err):
                _torch_load_error(path, err)
        try:  # legacy (non-zip) torch files cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            _torch_load_error(path, err)
    raise ValueError(
        f"Unsupported checkpoint file type {path.suffix!r} for {path}: expected one of "
        f"{', '.join(_TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES)}. Rename the file if it is a torch or safetensors file."
    )


def _is_weights_only_error(err: Exception) -> bool:
    text = str(err)
    return "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text


def _torch_load_error(path: Path, err: Exception):
    if _is_weights_only_error(err):
        hint = (
            "It pickles Python objects besides tensors, which `weights_only=True` refuses for safety. If you trust "
            "the file, re-save just its tensors: `sd = torch.load(path, weights_only=False); "
            "torch.save(sd['generator_ema'], 'clean.pt')` (or the container you need)."
        )
    else:
        hint = "The file is truncated, corrupted or not a torch checkpoint; re-download it."
    raise ValueError(
        f"Could not read {path} with torch.load(weights_only=True) ({type(err).__name__}: {err}). {hint}"
    ) from err


def load_original_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    r"""
    Read a transformer state dict from an original-format checkpoint and unwrap containers and prefixes.

    `.pt` / `.pth` / `.bin` / `.ckpt` files are read with `torch.load(weights_only=True, map_location="cpu")`,
    `.safetensors` with safetensors. Nested containers (`generator_ema`, `generator`, `model`, `state_dict`, `module`)
    are descended into (`generator_ema` wins over `generator` unless `key` says otherwise), then the prefixes in
    `CHECKPOINT_KEY_PREFIXES` shared by every key and the FSDP / checkpointing / compile wrapper components are
    removed.

    Args:
        path (`str` or `os.PathLike`): the checkpoint file.
        key (`str`, *optional*): the container to use (e.g. `"generator"` for the non-EMA weights); for flat files,
            the key prefix selecting one model.

    Returns:
        `dict[str, torch.Tensor]`: keys like `blocks.0.self_attn.q.weight` (original layout) or
        `blocks.0.attn1.to_q.weight` (already diffusers layout), on CPU.

    Raises:
        `FileNotFoundError`: no such file. `ValueError`: unreadable file or no state dict inside. `KeyError`: `key` is
        not in the checkpoint (the message lists the available containers).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Check the path (`--checkpoint`).")
    if path.is_dir():
        if (path / "config.json").exists():
            raise ValueError(
                f"{path} is a directory with a config.json, i.e. already a diffusers model folder: load it with "
                "`CausalWanTransformer3DModel.from_pretrained(path)` instead of converting it."
            )
        raise ValueError(f"{path} is a directory; pass the checkpoint file inside it (`.pt` or `.safetensors`).")
    if path.stat().st_size == 0:
        raise ValueError(f"Checkpoint {path} is empty (0 bytes); re-download or re-save it.")

    obj = _read_file(path)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"Checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors. Save the model's state dict "
            "(`torch.save(model.state_dict(), path)`) rather than the module or other objects."
        )

    requested = key
    trail = []
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping) or not obj:
            raise ValueError(
                f"Checkpoint {path} contains no state dict under {'/'.join(trail) or 'its top level'} "
                f"(found {type(obj).__name__}). Pass the container holding the transformer weights as `key`."
            )
        available = [k for k, v in obj.items() if isinstance(v, Mapping)]
        if requested is not None:
            if requested not in obj:
                raise KeyError(
                    f"Checkpoint {path} has no container `{requested}` at {'/'.join(trail) or 'the top level'}; "
                    f"available containers: {available}. Pass one of them as `key` (`--key`)."
                )
            chosen, requested = requested, None
        else:
            candidates = [c for c in CHECKPOINT_CONTAINER_KEYS if c in obj and isinstance(obj[c], Mapping)]
            if not candidates:
                raise ValueError(
                    f"Checkpoint {path} is not a transformer state dict: at {'/'.join(trail) or 'the top level'} "
                    f"it has {_describe(obj)} and none of the known containers {list(CHECKPOINT_CONTAINER_KEYS)}. "
                    "Pass the container holding the transformer weights as `key` (`--key`)."
                )
            chosen = candidates[0]
        trail.append(chosen)
        obj = obj[chosen]

    state_dict = dict(obj)
    state_dict = _select_flat_subset(state_dict, requested, path)
    state_dict = _strip_prefixes(state_dict)
    if not state_dict:
        raise ValueError(f"Checkpoint {path}: the selected weights are empty (key={key!r}).")
    return state_dict


@dataclass
class Conversion:
    """What :func:`convert_checkpoint` produced: the model and a summary for the user."""

    model: torch.nn.Module
    checkpoint: str
    output_dir: str
    source_layout: str
    model_class: str
    num_parameters: int
    dtypes: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    seconds: float = 0.0


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_keys_and_shapes(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Any, config: dict):
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    if missing or unexpected:
        hints = []
        wrapper_names = ("model", "generator", "generator_ema", "module")
        if unexpected and all(k.split(".", 1)[0] in wrapper_names for k in unexpected):
            hints.append("the keys carry a container prefix: pass `key=` / `--key`")
        if any(k.startswith("blocks.") for k in missing + unexpected):
            hints.append(
                f"the block count differs from num_layers={config.get('num_layers')}: is this the model size you "
                "meant (Wan2.1-1.3B: 30 layers, 14B: 40)? do not override `num_layers`"
            )
        if not hints:
            hints.append("the checkpoint is not a Wan2.1 T2V transformer or is truncated")
        raise ValueError(
            f"The converted state dict of {path} does not match {type(model).__name__}: "
            f"{len(missing)} missing key(s) [{_format_keys(missing)}]; "
            f"{len(unexpected)} unexpected key(s) [{_format_keys(unexpected)}]. Likely fix: {'; '.join(hints)}."
        )
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"The converted state dict of {path} has {len(mismatched)} tensor(s) whose shape does not match the "
            f"model built from config {config}: {_format_keys(mismatched)}. Remove the conflicting `config_overrides` "
            "or fix `attention_head_dim` / `num_attention_heads`."
        )


def convert_checkpoint(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    key: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    model_cls: type | None = None,
    overwrite: bool = False,
):
    r"""
    Convert an original-format (or already diffusers-layout) Wan2.1 checkpoint into a `save_pretrained` folder.

    The model is built on the meta device and the checkpoint tensors are assigned to it
    (`load_state_dict(strict=True, assign=True)`), so no random initialisation is paid for. The folder is written
    atomically: into a temporary directory next to `output_dir`, then renamed; if anything fails nothing is left at
    `output_dir`.

    Args:
        path: checkpoint file (see [`load_original_checkpoint`]).
        output_dir: destination folder (`config.json` + `diffusion_pytorch_model.safetensors`). Must not exist unless
            `overwrite=True`.
        key (`str`, *optional*): container to read (`generator_ema`, `generator`, ...).
        config_overrides (`Mapping`, *optional*): config entries replacing the inferred ones, e.g.
            `{"num_frames_per_block": 3, "attention_head_dim": 64}`. `attention_head_dim` / `num_attention_heads`
            also steer the config inference.
        dtype (`torch.dtype` or `"bf16"|"fp16"|"fp32"`, *optional*): cast floating tensors; modules listed in
            `model_cls._keep_in_fp32_modules` are stored in float32 (as diffusers loads them anyway). Default: keep
            the checkpoint dtypes.
        model_cls (`type`, *optional*): a `WanTransformer3DModel` (sub)class. Default:
            `raven_video.models.transformer_causal_wan.CausalWanTransformer3DModel`.
        overwrite (`bool`, defaults to `False`): replace an existing `output_dir`.

    Returns:
        :class:`Conversion`: the loaded model (on CPU, weights from the checkpoint) and what was converted.
    """
    start = time.perf_counter()
    path = Path(path)
    output_dir = Path(output_dir)
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
        dtype = _DTYPES[dtype.lower()]
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {output_dir} already exists. Choose a new `output_dir` or pass `overwrite=True` "
            "(`--overwrite`)."
        )
    if not output_dir.parent.exists():
        raise FileNotFoundError(
            f"The parent folder of output_dir ({output_dir.parent}) does not exist; create it first."
        )
    model_cls = CausalWanTransformer3DModel if model_cls is None else model_cls

    overrides = dict(config_overrides or {})
    init_params = inspect.signature(model_cls.__init__).parameters
    unknown = sorted(k for k in overrides if k not in init_params)
    if unknown:
        raise ValueError(
            f"config_overrides {unknown} are not arguments of {model_cls.__name__}; valid ones: "
            f"{sorted(p for p in init_params if p != 'self')}."
        )

    state_dict = load_original_checkpoint(path, key=key)
    layout = detect_state_dict_layout(state_dict)
    config = infer_wan_config_from_state_dict(
        state_dict,
        attention_head_dim=overrides.get("attention_head_dim"),
        num_attention_heads=overrides.get("num_attention_heads"),
    )
    config.update(overrides)
    if layout == "original":
        state_dict = convert_original_wan_state_dict(state_dict)

    with init_empty_weights():
        model = model_cls.from_config(config)
    _check_keys_and_shapes(model, state_dict, path, config)

    if dtype is not None:
        keep_fp32 = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())

        def _target_dtype(name: str) -> torch.dtype:
            parts = name.split(".")
            return torch.float32 if any(m in parts for m in keep_fp32) else dtype

        state_dict = {
            k: (v.to(_target_dtype(k)) if v.is_floating_point() else v) for k, v in state_dict.items()
        }
    # copy-free assignment; tensors from a memory-mapped torch file are materialised by `contiguous()` on save
    model.load_state_dict(state_dict, strict=True, assign=True)
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise RuntimeError(
                f"Buffer {name} of {model_cls.__name__} is still on the meta device after loading; it must be a "
                "non-persistent buffer created outside `init_empty_weights`. This is a bug in the model class."
            )

    with atomic_folder(output_dir, overwrite=overwrite) as tmp_dir:
        model.save_pretrained(tmp_dir, safe_serialization=True)
    return Conversion(
        model=model,
        checkpoint=str(path),
        output_dir=str(output_dir),
        source_layout=layout,
        model_class=model_cls.__name__,
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtypes=sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
        config={k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim")},
        seconds=round(time.perf_counter() - start, 2),
    )

# Copyright 2026 The RAVEN-video authors. Apache-2.0.
"""Convert original-format Wan2.1 checkpoints (Wan, Self Forcing, Causal Forcing, RAVEN) to the diffusers layout.

The original Wan code (``wan/modules/model.py`` and the causal forks built on it) names parameters
``blocks.N.self_attn.q.weight``, ``head.head.weight``, ...; diffusers' ``WanTransformer3DModel`` names the same tensors
``blocks.N.attn1.to_q.weight``, ``proj_out.weight``, .... The mapping is a pure rename (no tensor is reshaped); the
table below was checked against the key set of a real ``WanTransformer3DModel`` (see ``tests/test_conversion.py``).
One subtlety: the original block names its cross-attention norm ``norm3`` and its pre-FFN norm ``norm2``; diffusers
swaps the two. Only the cross-attention norm has parameters (``elementwise_affine=True``), so original
``blocks.N.norm3.*`` becomes diffusers ``blocks.N.norm2.*``.

Typical use::

    raven-convert --checkpoint self_forcing_dmd.pt --output_dir ./raven-transformer --key generator_ema

    from raven_video.models.conversion import convert_checkpoint
    convert_checkpoint("causal_forcing.pt", "./transformer", dtype=torch.bfloat16)
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


__all__ = [
    "CHECKPOINT_CONTAINER_KEYS",
    "CHECKPOINT_KEY_PREFIXES",
    "convert_checkpoint",
    "convert_diffusers_to_original_wan_state_dict",
    "convert_original_wan_state_dict",
    "detect_state_dict_layout",
    "infer_wan_config_from_state_dict",
    "load_original_checkpoint",
    "main",
]

# Top-level containers used by the training code bases, in order of preference when several are present.
# Self Forcing / Causal Forcing save {"generator": ..., "generator_ema": ..., "critic": ...}; the EMA weights are the
# ones released for inference, so they win unless `key=` says otherwise.
CHECKPOINT_CONTAINER_KEYS = ("generator_ema", "generator", "model", "state_dict", "module")

# Leading prefixes stripped while *every* key carries them, repeatedly:
# "generator_ema.model.blocks.0..." -> "blocks.0...".
CHECKPOINT_KEY_PREFIXES = (
    "generator_ema.",
    "generator.",
    "model.",
    "module.",
    "_orig_mod.",
    "_fsdp_wrapped_module.",
    "diffusion_model.",
)
# Wrapper components inserted *inside* keys by FSDP1 / activation checkpointing / torch.compile; removed everywhere.
_WRAPPER_COMPONENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)

# (original prefix, diffusers prefix) for keys outside the transformer blocks. A key matches a rule when it starts
# with the prefix; the remainder (".weight", ".bias", "") is kept. Longest prefixes first where they overlap.
_TOP_LEVEL_RENAMES = (
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    # image-to-video (Wan2.1 I2V / FLF2V) CLIP-feature projection
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)

# (original, diffusers) for the part of a block key after "blocks.N.".
_BLOCK_RENAMES = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    # the cross-attention norm: original norm3 == diffusers norm2 (the parameter-free norms have no keys)
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------------------------
# key mapping
# ----------------------------------------------------------------------------------------------------------------


def _rename_key(key: str, top_level: tuple, block_level: tuple) -> str | None:
    match = _BLOCK_KEY.match(key)
    if match is not None:
        index, rest = match.groups()
        for src, dst in block_level:
            if rest == src or rest.startswith(src) and src.endswith("."):
                return f"blocks.{index}.{dst}{rest[len(src):]}"
        return None
    for src, dst in top_level:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    return None


def _rename_state_dict(state_dict: Mapping[str, Any], top_level: tuple, block_level: tuple) -> dict[str, Any]:
    converted: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = _rename_key(key, top_level, block_level)
        if new_key is None:
            new_key = key  # unknown keys pass through; loading reports them as unexpected
        if new_key in converted:
            raise ValueError(
                f"Keys {sources[new_key]!r} and {key!r} both map to {new_key!r}: the state dict mixes the original "
                "Wan and the diffusers layouts. Convert a state dict in one layout only."
            )
        converted[new_key] = value
        sources[new_key] = key
    return converted


def convert_original_wan_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""
    Rename an original-layout Wan2.1 transformer state dict to diffusers' `WanTransformer3DModel` layout.

    Tensors are not copied or reshaped. Keys that match no rule (e.g. extra training-only modules) are passed through
    unchanged so that loading reports them as unexpected.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`):
            Original keys without wrapper prefixes, e.g. `blocks.0.self_attn.q.weight` (use
            [`load_original_checkpoint`] to strip `model.` / `generator_ema.` prefixes first).

    Returns:
        `dict[str, torch.Tensor]`: the same tensors under diffusers keys, e.g. `blocks.0.attn1.to_q.weight`.
    """
    return _rename_state_dict(state_dict, _TOP_LEVEL_RENAMES, _BLOCK_RENAMES)


def convert_diffusers_to_original_wan_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""
    Inverse of [`convert_original_wan_state_dict`]: diffusers `WanTransformer3DModel` keys -> original Wan keys.

    Used to export a model to the Self Forcing / Causal Forcing layout (wrap the result as
    `{"generator_ema": {"model." + k: v}}` for their loaders). Unknown keys pass through unchanged.
    """
    inverse_top = tuple((dst, src) for src, dst in _TOP_LEVEL_RENAMES)
    inverse_block = tuple((dst, src) for src, dst in _BLOCK_RENAMES)
    # "scale_shift_table" is both the head modulation (top level) and the block modulation (inside blocks): the
    # block regex is tried first, so a top-level "scale_shift_table" always maps to "head.modulation".
    return _rename_state_dict(state_dict, inverse_top, inverse_block)


def detect_state_dict_layout(state_dict: Mapping[str, Any]) -> str:
    r"""
    Returns `"original"` for Wan-repo keys (`blocks.N.self_attn.q.weight`), `"diffusers"` for `WanTransformer3DModel`
    keys (`blocks.N.attn1.to_q.weight`), and raises `ValueError` when the keys look like neither.
    """
    keys = list(state_dict.keys())
    if any(".self_attn." in k or k.startswith(("head.head.", "time_projection.", "text_embedding.")) for k in keys):
        return "original"
    if any(".attn1." in k or k.startswith(("proj_out.", "condition_embedder.")) for k in keys):
        return "diffusers"
    raise ValueError(
        "The state dict does not look like a Wan transformer: none of its keys match the original layout "
        "(`blocks.N.self_attn.q.weight`, `head.head.weight`) or the diffusers layout (`blocks.N.attn1.to_q.weight`, "
        f"`proj_out.weight`). First keys: {keys[:10]}. If the weights sit under a container (e.g. `generator_ema`) "
        "or a prefix, load the file with `load_original_checkpoint(path, key=...)`."
    )


# ----------------------------------------------------------------------------------------------------------------
# config inference
# ----------------------------------------------------------------------------------------------------------------


def _require(sd: Mapping[str, Any], key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(
            f"Cannot infer the Wan config: the state dict has no `{key}`. Is this a Wan2.1 transformer checkpoint? "
            f"First keys: {list(sd.keys())[:10]}."
        )
    return sd[key]


def infer_wan_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    attention_head_dim: int | None = None,
    num_attention_heads: int | None = None,
) -> dict[str, Any]:
    r"""
    Infer the `WanTransformer3DModel` config from tensor shapes, so a 1.3B or a 14B checkpoint converts without a
    config file.

    The number of heads is not recoverable from the weights (the q/k norms span all heads), so it is derived from the
    head size: `attention_head_dim=128` for every released Wan2.1 model (1.3B: 12 x 128, 14B: 40 x 128). Pass
    `attention_head_dim` or `num_attention_heads` for other models (e.g. tiny test configs).

    Args:
        state_dict: original-layout or diffusers-layout keys (detected with [`detect_state_dict_layout`]).
        attention_head_dim (`int`, *optional*, defaults to 128 unless `num_attention_heads` is given).
        num_attention_heads (`int`, *optional*): overrides the head-size rule.

    Returns:
        `dict`: `WanTransformer3DModel.__init__` keyword arguments (`patch_size`, `num_attention_heads`,
        `attention_head_dim`, `in_channels`, `out_channels`, `text_dim`, `freq_dim`, `ffn_dim`, `num_layers`,
        `cross_attn_norm`, `qk_norm`, `eps`, `image_dim`, `added_kv_proj_dim`, `pos_embed_seq_len`).
    """
    if detect_state_dict_layout(state_dict) == "diffusers":
        state_dict = convert_diffusers_to_original_wan_state_dict(state_dict)

    patch_weight = _require(state_dict, "patch_embedding.weight")  # [inner_dim, in_channels, pt, ph, pw]
    if patch_weight.ndim != 5:
        raise ValueError(
            f"`patch_embedding.weight` has shape {tuple(patch_weight.shape)}; a Wan2.1 transformer has a Conv3d "
            "patch embedding of shape [inner_dim, in_channels, pt, ph, pw]."
        )
    inner_dim, in_channels = int(patch_weight.shape[0]), int(patch_weight.shape[1])
    patch_size = tuple(int(s) for s in patch_weight.shape[2:])

    if num_attention_heads is not None:
        if inner_dim % num_attention_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} does not divide the model width {inner_dim}; pick a "
                "divisor (Wan2.1-1.3B: 12, Wan2.1-14B: 40)."
            )
        head_dim = inner_dim // num_attention_heads
        if attention_head_dim is not None and attention_head_dim != head_dim:
            raise ValueError(
                f"attention_head_dim={attention_head_dim} and num_attention_heads={num_attention_heads} disagree with "
                f"the model width {inner_dim}; give only one of them."
            )
        heads = num_attention_heads
    else:
        head_dim = 128 if attention_head_dim is None else int(attention_head_dim)
        if inner_dim % head_dim:
            raise ValueError(
                f"The model width {inner_dim} (from `patch_embedding.weight`) is not a multiple of "
                f"attention_head_dim={head_dim}; pass the right `attention_head_dim` or `num_attention_heads`."
            )
        heads = inner_dim // head_dim

    block_indices = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if not block_indices:
        raise ValueError("Cannot infer the Wan config: the state dict has no `blocks.N.*` keys.")
    num_layers = max(block_indices) + 1

    head_weight = _require(state_dict, "head.head.weight")  # [prod(patch) * out_channels, inner_dim]
    patch_volume = patch_size[0] * patch_size[1] * patch_size[2]
    out_channels = int(head_weight.shape[0]) // patch_volume

    config: dict[str, Any] = {
        "patch_size": patch_size,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "text_dim": int(_require(state_dict, "text_embedding.0.weight").shape[1]),
        "freq_dim": int(_require(state_dict, "time_embedding.0.weight").shape[1]),
        "ffn_dim": int(_require(state_dict, "blocks.0.ffn.0.weight").shape[0]),
        "num_layers": num_layers,
        "cross_attn_norm": "blocks.0.norm3.weight" in state_dict,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in state_dict else None,
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "pos_embed_seq_len": None,
    }
    if "img_emb.proj.0.weight" in state_dict:
        config["image_dim"] = int(state_dict["img_emb.proj.0.weight"].shape[0])
    if "blocks.0.cross_attn.k_img.weight" in state_dict:
        config["added_kv_proj_dim"] = int(state_dict["blocks.0.cross_attn.k_img.weight"].shape[1])
    if "img_emb.emb_pos" in state_dict:
        config["pos_embed_seq_len"] = int(state_dict["img_emb.emb_pos"].shape[1])
    return config


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------


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
    for wrapper in _WRAPPER_COMPONENTS:
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


# ----------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _default_model_cls():
    try:
        from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel
    except ImportError as err:
        raise ImportError(
            "raven_video.models.transformer_causal_wan.CausalWanTransformer3DModel could not be imported "
            f"({err}). Pass `model_cls=diffusers.WanTransformer3DModel` (CLI: `--model_class wan`) to convert into "
            "the plain Wan layout; both share the same weights and keys."
        ) from err
    return CausalWanTransformer3DModel


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
        the loaded model (on CPU, weights from the checkpoint).
    """
    from accelerate import init_empty_weights

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
    model_cls = _default_model_cls() if model_cls is None else model_cls

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

    # atomic save: temp dir in the same parent (same filesystem), then rename
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    backup = None
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        if output_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.rmdir(backup)
            os.rename(output_dir, backup)
        os.rename(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if backup is not None and backup.exists() and not output_dir.exists():
            os.rename(backup, output_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)

    model._raven_conversion_summary = {
        "checkpoint": str(path),
        "output_dir": str(output_dir),
        "source_layout": layout,
        "model_class": model_cls.__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
        "config": {
            k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim")
        },
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="raven-convert",
        description="Convert an original-format Wan2.1 / Self Forcing / Causal Forcing / RAVEN transformer checkpoint "
        "(.pt, .pth or .safetensors) into a diffusers folder loadable with "
        "CausalWanTransformer3DModel.from_pretrained.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pt/.pth/.bin/.ckpt/.safetensors)")
    parser.add_argument("--output_dir", required=True, help="destination folder (must not exist unless --overwrite)")
    parser.add_argument("--key", default=None, help="container to read, e.g. generator_ema (default) or generator")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="cast weights (default: keep)")
    parser.add_argument("--num_frames_per_block", type=int, default=None, help="latent frames per causal chunk (3)")
    parser.add_argument(
        "--num_frames_first_block", type=int, default=None, help="latent frames of the first chunk (3)"
    )
    parser.add_argument("--local_attn_size", type=int, default=None, help="local attention window in latent frames")
    parser.add_argument("--sink_size", type=int, default=None, help="attention-sink size in latent frames")
    parser.add_argument("--attention_head_dim", type=int, default=None, help="head size (default 128, all Wan2.1)")
    parser.add_argument(
        "--model_class", default="causal", choices=["causal", "wan"],
        help="causal: CausalWanTransformer3DModel (default); wan: plain diffusers WanTransformer3DModel",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`raven-convert` entry point; returns the process exit code."""
    args = _parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in (
            "num_frames_per_block", "num_frames_first_block", "local_attn_size", "sink_size", "attention_head_dim"
        )
        if getattr(args, name) is not None
    }
    if args.model_class == "wan":
        from diffusers import WanTransformer3DModel

        model_cls = WanTransformer3DModel
        causal_only = sorted(set(overrides) - {"attention_head_dim"})
        if causal_only:
            print(f"error: {causal_only} only apply to --model_class causal.", file=sys.stderr)
            return 2
    else:
        model_cls = None
    try:
        model = convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            key=args.key,
            config_overrides=overrides,
            dtype=args.dtype,
            model_cls=model_cls,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, ImportError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    summary = model._raven_conversion_summary
    print(f"Converted {summary['checkpoint']} ({summary['source_layout']} layout) -> {summary['output_dir']}")
    print(f"  class      : {summary['model_class']}")
    print(f"  parameters : {summary['num_parameters'] / 1e6:.2f} M ({', '.join(summary['dtypes'])})")
    print("  config     : " + ", ".join(f"{k}={v}" for k, v in summary["config"].items()))
    print(f"  time       : {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

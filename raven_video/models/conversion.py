# Copyright 2026 The RAVEN-video authors. Apache-2.0.
"""Convert original-format Wan2.1 checkpoints (Wan, Self Forcing, Causal Forcing, RAVEN) to the diffusers layout.

The original Wan code (``wan/modules/model.py`` and the causal forks built on it) names parameters
``blocks.N.self_attn.q.weight``, ``head.head.weight``, ...; diffusers' ``WanTransformer3DModel`` names the same tensors
``blocks.N.attn1.to_q.weight``, ``proj_out.weight``, .... The mapping is a pure rename (no tensor is reshaped); the
table below was checked against the key set of a real ``WanTransformer3DModel`` (see ``tests/test_conversion.py``).
One subtlety: the original block names its cross-attention norm ``norm3`` and its pre-FFN norm ``norm2``; diffusers
swaps the two. Only the cross-attention norm has parameters (``elementwise_affine=True``), so original
``blocks.N.norm3.*`` becomes diffusers ``blocks.N.norm2.*``.

This module is the key map and the config inference (pure functions on state dicts); reading checkpoint files and
writing model folders is :mod:`raven_video.models.checkpoints`, the command line ``raven-convert`` is
:mod:`raven_video.cli.convert`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch


__all__ = [
    "CHECKPOINT_CONTAINER_KEYS",
    "CHECKPOINT_KEY_PREFIXES",
    "convert_diffusers_to_original_wan_state_dict",
    "convert_original_wan_state_dict",
    "detect_state_dict_layout",
    "infer_wan_config_from_state_dict",
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
WRAPPER_COMPONENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

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

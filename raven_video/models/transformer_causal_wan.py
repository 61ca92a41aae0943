"""Causal Wan2.1 transformer: one class for the RAVEN student, the critic and the teacher (DESIGN invariant 1).

``CausalWanTransformer3DModel`` subclasses diffusers' ``WanTransformer3DModel`` and adds no parameter, so every
Wan2.1 T2V diffusers checkpoint loads with identical keys. Causality is only an attention pattern, a RoPE frame
offset and per-frame timesteps (docs/method.md §2):

============================  =====================================================================================
mode                          call
============================  =====================================================================================
bidirectional (teacher/critic) ``model(x, t, text)`` -- numerically identical to ``WanTransformer3DModel``
block-causal full sequence    ``model(x, t_per_frame, text, causal=True)``
streaming (KV cache)          ``model(chunk, t, text, kv_cache=cache, frame_offset=f0, update_cache=...)``
training-time test            ``model.forward_interleaved(noisy, clean, t, text)`` -- ``[z1, x1, ..., zN]`` (Eq. 5)
============================  =====================================================================================

Masks, caches and offsets are forward arguments handed to every block explicitly (DESIGN invariant 4): attention
processors hold no mutable state, so activation checkpointing and ``torch.compile`` can re-run blocks safely.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up by name here)
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanTransformer3DModel,
    WanTransformerBlock,
    _get_qkv_projections,
)
from diffusers.utils import apply_lora_scale, logging

from .attention_layout import FrameLayout, chunk_sizes, flex_block_mask, sdpa_token_mask, validate_window
from .kv_cache import KVCacheLayer, WanKVCache

logger = logging.get_logger(__name__)


def load_fa4(device) -> tuple[Any, str | None]:
    """FlashAttention-4's ``flash_attn_func`` (``pip install raven-video[fa4]``: the CuTe-DSL kernels, JIT-compiled,
    sm90 / sm100) as ``fn(q, k, v) -> out`` on ``[B, L, H, D]`` tensors, or ``(None, reason)`` where it cannot run."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"FlashAttention-4 needs a CUDA GPU (the transformer is on {device})"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return None, f"FlashAttention-4 runs on sm90 / sm100 GPUs (this one is sm{major}{minor})"
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as err:
        return None, f"flash-attn-4 is not installed ({err}; pip install raven-video[fa4])"

    def fa4(query, key, value):
        out = flash_attn_func(query, key, value, causal=False)
        return out[0] if isinstance(out, tuple) else out  # (out, lse) in the CuTe interface

    return fa4, None

_compiled_flex_attention = None


def _flex_attention(query, key, value, block_mask):
    """flex attention on ``[B, L, H, D]`` tensors; compiled once (eager flex materialises the full score matrix)."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    fn = _compiled_flex_attention if query.is_cuda else flex_attention
    out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a diffusers model's floating parameters and buffers to ``dtype`` in place; in half precision its
    ``_keep_in_fp32_modules`` (Wan: RoPE, time embedder, modulation tables, norms) stay float32, as
    ``from_pretrained(..., dtype=...)`` keeps them (``ModelMixin.to(dtype)`` casts them too, and warns)."""
    half = dtype in (torch.float16, torch.bfloat16)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) if half else set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    return model


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE (same arithmetic as diffusers' ``WanAttnProcessor``, bit for bit).

    The rotated pairs are stacked and flattened rather than written into the even and odd slices of an empty tensor:
    compiled, the slice writes made one slow kernel of the RMS norm and RoPE of Q and K (H200: 65 ms of a video's
    kernels), the stacked form a reduction and a pointwise kernel (38 ms, BENCHMARKS.md)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(hidden_states)


class CausalWanAttnProcessor:
    """Stateless attention processor for both attentions of a :class:`CausalWanTransformerBlock`.

    The math is split in pieces the block calls directly, so that the pointwise-heavy parts can be compiled with
    static shapes while the part whose shape changes with the chunk position (gathering cached K/V) stays eager:

    - :meth:`project_qkv`: self-attention Q/K/V + RMSNorm + RoPE;
    - :meth:`attend`: prepend the visible cached K/V, attention (dense bool mask -> SDPA, ``BlockMask`` -> flex),
      then write the chunk's post-RoPE K/V into the cache when asked;
    - :meth:`text_kv` / :meth:`cross_attend`: cross-attention with text K/V computed once per prompt.

    ``_attention_backend`` is configuration (``model.set_attention_backend``), not per-call state.
    """

    _attention_backend = None
    _parallel_config = None
    _sdpa_backends = None  # e.g. [SDPBackend.CUDNN_ATTENTION]: the unmasked (streaming) self-attention kernel
    _self_attention_fn = None  # or a kernel ``fn(q, k, v)`` on [B, L, H, D] for it (FlashAttention-4)

    @staticmethod
    def project_qkv(attn: WanAttention, hidden_states: torch.Tensor, rotary_emb=None):
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        return query, key, value

    def attend(self, query, key, value, attention_mask=None, kv_cache: KVCacheLayer | None = None,
               update_cache: bool = False) -> torch.Tensor:
        """``[B, L, H, D]`` tensors -> attention output ``[B, L, H * D]`` (before the output projection)."""
        full_key, full_value = (key, value) if kv_cache is None else kv_cache.extend(key, value)
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            out = _flex_attention(query, full_key, full_value, attention_mask)
        elif attention_mask is None and self._self_attention_fn is not None:
            out = self._self_attention_fn(query, full_key, full_value)
        elif attention_mask is None and self._sdpa_backends is not None:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(self._sdpa_backends):
                out = F.scaled_dot_product_attention(
                    query.transpose(1, 2), full_key.transpose(1, 2), full_value.transpose(1, 2)
                ).transpose(1, 2)
        else:
            out = dispatch_attention_fn(
                query, full_key, full_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend,
            )
        if kv_cache is not None and update_cache:
            kv_cache.write(key, value)
        return out.flatten(2, 3).type_as(query)

    @staticmethod
    def text_kv(attn: WanAttention, encoder_hidden_states: torch.Tensor):
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        return key, value

    def cross_attend(self, attn: WanAttention, hidden_states, key, value) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: Any = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCacheLayer | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        if attn.is_cross_attention:
            return self.cross_attend(attn, hidden_states, *self.text_kv(attn, encoder_hidden_states))
        query, key, value = self.project_qkv(attn, hidden_states, rotary_emb)
        out = self.attend(query, key, value, attention_mask, kv_cache, update_cache)
        return attn.to_out[1](attn.to_out[0](out))


def _block_pre_attention(block: "CausalWanTransformerBlock", hidden_states, temb, rotary_emb):
    """Modulation + self-attention Q/K/V (compilable: static shapes). ``temb``: ``[B, F_mod, 6, D]``."""
    batch, length, dim = hidden_states.shape
    frames = temb.shape[1]
    mod = (block.scale_shift_table.unsqueeze(0) + temb.float()).unsqueeze(3)  # [B, F_mod, 6, 1, D]
    shift_msa, scale_msa = mod[:, :, 0], mod[:, :, 1]
    norm = block.norm1(hidden_states.float()).view(batch, frames, length // frames, dim)
    norm = (norm * (1 + scale_msa) + shift_msa).view(batch, length, dim).type_as(hidden_states)
    return block.attn1.processor.project_qkv(block.attn1, norm, rotary_emb)


def _block_post_attention(block: "CausalWanTransformerBlock", hidden_states, attn_output, temb, text_key, text_value):
    """Gate + residual, cross-attention on text K/V, feed-forward (compilable: static shapes)."""
    batch, length, dim = hidden_states.shape
    frames = temb.shape[1]
    mod = (block.scale_shift_table.unsqueeze(0) + temb.float()).unsqueeze(3)
    gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mod[:, :, 2], mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]

    def per_frame(x):  # [B, L, D] -> [B, F_mod, L / F_mod, D]
        return x.view(batch, frames, length // frames, dim)

    dtype = hidden_states.dtype
    attn_output = block.attn1.to_out[1](block.attn1.to_out[0](attn_output))
    hidden_states = (per_frame(hidden_states.float()) + per_frame(attn_output) * gate_msa).view(batch, length, dim)
    hidden_states = hidden_states.to(dtype)

    norm = block.norm2(hidden_states.float()).type_as(hidden_states)
    hidden_states = hidden_states + block.attn2.processor.cross_attend(block.attn2, norm, text_key, text_value)

    norm = (per_frame(block.norm3(hidden_states.float())) * (1 + c_scale_msa) + c_shift_msa).view(batch, length, dim)
    ff_output = _feed_forward(block, norm.type_as(hidden_states))
    out = per_frame(hidden_states.float()) + per_frame(ff_output.float()) * c_gate_msa
    return out.view(batch, length, dim).type_as(hidden_states)


def _gelu_epilogue_fits(block: "CausalWanTransformerBlock") -> bool:
    """Whether the block's FFN opens with a plain biased ``nn.Linear`` and Wan's tanh GELU on a CUDA device: the
    form one cuBLASLt GEMM with a GELU epilogue computes (not FP8 or peft-wrapped linears; not on CPU, where
    ``torch._addmm_activation`` computes the erf GELU instead of the tanh one)."""
    act = block.ffn.net[0]
    proj = getattr(act, "proj", None)
    return (type(proj) is nn.Linear and proj.bias is not None and getattr(act, "approximate", None) == "tanh"
            and proj.weight.is_cuda)


def _feed_forward(block: "CausalWanTransformerBlock", hidden_states: torch.Tensor) -> torch.Tensor:
    """The block's FFN. With ``block._gelu_epilogue`` (:meth:`CausalWanTransformer3DModel.set_gelu_epilogue`) the
    first linear and its tanh GELU are one cuBLASLt GEMM whose epilogue adds the bias and applies the GELU
    (``torch._addmm_activation``): the separate GELU kernel, a read and a write of the ``[L, ffn_dim]`` activation,
    is gone (H200, 4,680 tokens: the FFN 419 -> 380 us; a streamed 81-frame video 2.711 -> 2.677 s, BENCHMARKS.md).
    The GELU is then applied to the fp32 accumulator before the bf16 rounding, where the module path rounds twice."""
    ffn = block.ffn
    # the fit is checked per call too (an adapter may wrap the linear, the model may move to the CPU after
    # set_gelu_epilogue), and the fused op has no derivative (inference only)
    if not (block._gelu_epilogue and _gelu_epilogue_fits(block) and not torch.is_grad_enabled()):
        return ffn(hidden_states)
    proj = ffn.net[0].proj
    out = torch._addmm_activation(proj.bias, hidden_states.reshape(-1, hidden_states.shape[-1]), proj.weight.t(),
                                  use_gelu=True)
    out = out.view(*hidden_states.shape[:-1], out.shape[-1])
    for module in ffn.net[1:]:  # dropout (identity in eval), the second linear
        out = module(out)
    return out


class CausalWanTransformerBlock(WanTransformerBlock):
    """A ``WanTransformerBlock`` (same parameters) whose forward takes per-frame modulation, an explicit attention
    mask and an explicit KV cache layer.

    ``temb``: ``[B, F_mod, 6, D]``; ``F_mod`` is 1 (one timestep per sample) or the number of sequence frames
    (per-frame timesteps), broadcast over the ``L // F_mod`` tokens of each frame. The two static-shape halves around
    the attention are module-level functions (:func:`_block_pre_attention`, :func:`_block_post_attention`) that
    :meth:`CausalWanTransformer3DModel.compile_streaming` compiles once for all blocks.
    """

    # Replaced by compiled versions (shared by all blocks) in CausalWanTransformer3DModel.compile_streaming().
    _pre_attention = staticmethod(_block_pre_attention)
    _post_attention = staticmethod(_block_post_attention)
    _gelu_epilogue = False  # set per block by CausalWanTransformer3DModel.set_gelu_epilogue (inference speed)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn1.set_processor(CausalWanAttnProcessor())
        self.attn2.set_processor(CausalWanAttnProcessor())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any = None,
        kv_cache: KVCacheLayer | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        query, key, value = self._pre_attention(self, hidden_states, temb, rotary_emb)
        attn_output = self.attn1.processor.attend(query, key, value, attention_mask, kv_cache, update_cache)
        text_key, text_value = kv_cache.text() if kv_cache is not None else (None, None)
        if text_key is None:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states is required until the KV cache holds the text K/V.")
            text_key, text_value = self.attn2.processor.text_kv(self.attn2, encoder_hidden_states)
            if kv_cache is not None:
                kv_cache.set_text(text_key, text_value)
        return self._post_attention(self, hidden_states, attn_output, temb, text_key, text_value)


class CausalWanTransformer3DModel(WanTransformer3DModel):
    r"""Wan2.1 transformer with block-causal, KV-cached streaming and training-time-test forward modes.

    Same parameters (and parameter names) as diffusers' ``WanTransformer3DModel``; the extra config keys only describe
    the chunking and the attention window.

    Args:
        num_frames_per_block (`int`, defaults to 3): latent frames per chunk (docs/method.md §1.4).
        num_frames_first_block (`int`, *optional*): latent frames of the first chunk; ``None`` = ``num_frames_per_block``.
        local_attn_size (`int`, defaults to -1): attention window in latent frames, including the current chunk and the
            sink (-1 = unlimited history). For streams longer than training; RoPE positions stop at
            ``rope_max_seq_len`` (1024 latent frames ~ 4 min 16 s at 16 fps) -- raise it at load time for longer.
        sink_size (`int`, defaults to 0): first latent frames that stay visible forever (attention sink).
        Other arguments: see ``WanTransformer3DModel``.
    """

    _no_split_modules = ["CausalWanTransformerBlock"]
    _repeated_blocks = ["CausalWanTransformerBlock"]
    _cp_plan = None  # context parallel would split our explicit per-frame inputs; not supported

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        num_frames_per_block: int = 3,
        num_frames_first_block: int | None = None,
        local_attn_size: int = -1,
        sink_size: int = 0,
    ) -> None:
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim,
            num_layers=0, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len, pos_embed_seq_len=pos_embed_seq_len,
        )
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ValueError("CausalWanTransformer3DModel supports text-to-video Wan only (image_dim/added_kv_proj_dim).")
        if tuple(patch_size)[0] != 1:
            raise ValueError(f"patch_size={patch_size}: the causal model needs a temporal patch of 1 (Wan2.1).")
        validate_window(local_attn_size, sink_size, num_frames_per_block)
        # The parent's own @register_to_config recorded num_layers=0: restore the real value.
        self.register_to_config(num_layers=num_layers)
        inner_dim = num_attention_heads * attention_head_dim
        # The parent built zero blocks (num_layers=0 above); the config keeps the real num_layers.
        self.blocks = nn.ModuleList(
            [
                CausalWanTransformerBlock(
                    inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim
                )
                for _ in range(num_layers)
            ]
        )

    # ------------------------------------------------------------------ speed
    def compile_streaming(self, **compile_kwargs) -> None:
        """Regional ``torch.compile``: the two static-shape halves of every block (modulation, QKV, RoPE / gates,
        cross-attention, FFN) are compiled once and shared by all blocks; the KV-cache gather and the attention call,
        whose shapes change with the chunk position, stay eager, so streaming never recompiles per position."""
        pre = torch.compile(_block_pre_attention, **compile_kwargs)
        post = torch.compile(_block_post_attention, **compile_kwargs)
        for block in self.blocks:
            block._pre_attention = pre
            block._post_attention = post

    def set_gelu_epilogue(self, enabled: bool = True) -> int:
        """Run each block's FFN up-projection and tanh GELU as one cuBLASLt GEMM with a GELU epilogue
        (:func:`_feed_forward`), for inference on CUDA; ``enable_realtime`` turns it on. Blocks whose FFN does not
        fit (FP8 or peft-wrapped linears, a CPU device) keep the module path. Returns how many blocks use it."""
        count = 0
        for block in self.blocks:
            block._gelu_epilogue = bool(enabled) and _gelu_epilogue_fits(block)
            count += block._gelu_epilogue
        return count

    def set_self_attention_kernel(self, kernel: str | None) -> None:
        """Pick the kernel of the unmasked self-attention (streaming, bidirectional): ``"fa4"`` (FlashAttention-4,
        0.64 vs 0.75 ms for a chunk against 9 frames of cache on an H200; falls back to ``"cudnn"`` with one log
        line where it cannot run, :func:`load_fa4`), PyTorch SDPA's ``"cudnn"`` (fastest SDPA kernel on H100: 548 vs
        317 TFLOP/s, BENCHMARKS.md), ``"flash"``, ``"efficient"``, ``"math"``, ``"fa3"`` (PyTorch's FlashAttention-3
        implementation, where this torch build has it) or ``None`` (diffusers' dispatcher, the default). Masked
        training attention is unaffected."""
        from torch.nn.attention import SDPBackend

        choices = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "fa3": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        if kernel is not None and kernel not in choices and kernel != "fa4":
            raise ValueError(f"self-attention kernel {kernel!r}; choose one of {sorted(choices) + ['fa4']} or None.")
        function = None
        if kernel == "fa4":
            device = next(self.parameters()).device
            function, reason = load_fa4(device)
            if function is None:
                kernel = "cudnn" if device.type == "cuda" else None
                logger.warning("self-attention kernel 'fa4' unavailable (%s); using %s", reason,
                               "PyTorch SDPA's cuDNN kernel" if kernel else "the default attention")
        if kernel == "fa3":
            activate = getattr(torch.nn.attention, "activate_flash_attention_impl", None)
            if activate is None or "FA3" not in torch.nn.attention.list_flash_attention_impls():
                raise ValueError("this torch build has no FlashAttention-3 implementation; use 'cudnn' or 'flash'.")
            activate("FA3")
        for block in self.blocks:
            block.attn1.processor._self_attention_fn = function
            block.attn1.processor._sdpa_backends = None if kernel in (None, "fa4") else [choices[kernel]]

    # ------------------------------------------------------------------ helpers
    @property
    def tokens_per_frame_for(self):
        """``(height, width) -> tokens per latent frame`` for this patch size."""
        _, p_h, p_w = self.config.patch_size
        return lambda height, width: (height // p_h) * (width // p_w)

    def chunk_sizes(self, num_frames: int) -> list[int]:
        """Latent frames per chunk for a video of ``num_frames`` latent frames (validates the fit)."""
        return chunk_sizes(num_frames, self.config.num_frames_per_block, self.config.num_frames_first_block)

    @torch.no_grad()
    def cache_text(self, encoder_hidden_states: torch.Tensor, kv_cache: WanKVCache) -> None:
        """Put a prompt's cross-attention text K/V into ``kv_cache`` up front, as the first streaming forward would
        inside its blocks: every streaming forward, the first included, can then run without text (and be replayed as
        a CUDA graph, :mod:`raven_video.pipelines.cuda_graphs`). ``encoder_hidden_states``: ``[B, 512, text_dim]``."""
        text = self.condition_embedder.text_embedder(encoder_hidden_states)
        for index, block in enumerate(self.blocks):
            kv_cache.layer(index, None).set_text(*block.attn2.processor.text_kv(block.attn2, text))

    def new_kv_cache(
        self,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        max_frames: int | None = None,
        local_attn_size: int | None = None,
        sink_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cache_text: bool = True,
    ) -> WanKVCache:
        """Allocate a :class:`WanKVCache` for streaming ``batch_size`` videos at the given latent size
        (``cache_text=False``: the text K/V are recomputed by every forward, see :class:`WanKVCache`)."""
        cfg = self.config
        local = cfg.local_attn_size if local_attn_size is None else local_attn_size
        sink = cfg.sink_size if sink_size is None else sink_size
        validate_window(local, sink, cfg.num_frames_per_block)
        return WanKVCache(
            num_layers=cfg.num_layers,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            batch_size=batch_size,
            tokens_per_frame=self.tokens_per_frame_for(latent_height, latent_width),
            max_frames=max_frames,
            local_attn_size=local,
            sink_size=sink,
            frames_per_block=cfg.num_frames_per_block,
            dtype=dtype or self.dtype,
            device=device or self.device,
            cache_text=cache_text,
        )

    _ROTARY_CACHE_SIZE = 64

    def rotary_tables(self, frame_offset: int, num_frames: int, latent_height: int, latent_width: int,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables a streaming forward of ``num_frames`` latent frames at ``frame_offset`` reads (cached, see
        :meth:`_rotary`). A CUDA-graph capture builds them first and holds them: building copies from the host, and
        the cache evicts old positions in streams of more than ``_ROTARY_CACHE_SIZE`` chunks."""
        _, p_h, p_w = self.config.patch_size
        positions = list(range(frame_offset, frame_offset + num_frames))
        return self._rotary(positions, latent_height // p_h, latent_width // p_w, device)

    def _rotary(self, positions: list[int], pph: int, ppw: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables ``[1, F*pph*ppw, 1, head_dim]`` for arbitrary temporal positions (docs/method.md §2: frame offsets).

        Cached per (positions, grid, device, table version): a streaming forward then launches no table kernels and
        copies nothing from the host, which CUDA-graph capture needs (`enable_realtime(cuda_graphs=True)`).
        """
        rope = self.rope
        key = (tuple(positions), pph, ppw, str(device), rope.freqs_cos.data_ptr(), rope.freqs_cos._version)
        cache = self.__dict__.setdefault("_rotary_tables", {})
        if key not in cache:
            if len(cache) >= self._ROTARY_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = self._rotary_tables_uncached(positions, pph, ppw, device)
        return cache[key]

    def _rotary_tables_uncached(self, positions, pph, ppw, device) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.rope
        if max(positions) >= rope.max_seq_len:
            raise ValueError(
                f"latent frame position {max(positions)} exceeds rope_max_seq_len={rope.max_seq_len} "
                f"(~{rope.max_seq_len * 4 / 16:.0f} s at 16 fps). Load the model with a larger `rope_max_seq_len` "
                "(e.g. from_pretrained(..., rope_max_seq_len=4096)) or shorten the stream."
            )
        index = torch.tensor(positions, device=rope.freqs_cos.device)
        sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
        tables = []
        for freqs in (rope.freqs_cos, rope.freqs_sin):
            f_t, f_h, f_w = freqs.split(sizes, dim=1)
            nf = len(positions)
            f_t = f_t[index].view(nf, 1, 1, -1).expand(nf, pph, ppw, -1)
            f_h = f_h[:pph].view(1, pph, 1, -1).expand(nf, pph, ppw, -1)
            f_w = f_w[:ppw].view(1, 1, ppw, -1).expand(nf, pph, ppw, -1)
            tables.append(torch.cat([f_t, f_h, f_w], dim=-1).reshape(1, nf * pph * ppw, 1, -1).to(device))
        return tables[0], tables[1]

    def _embed_timesteps(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``timestep`` ``[B]`` or ``[B, F]`` -> ``temb`` ``[B, F_mod, D]`` and ``timestep_proj`` ``[B, F_mod, 6, D]``."""
        emb = self.condition_embedder
        batch = timestep.shape[0]
        t = emb.timesteps_proj(timestep.flatten())
        t_dtype = next(iter(emb.time_embedder.parameters())).dtype
        if t.dtype != t_dtype and t_dtype != torch.int8:
            t = t.to(t_dtype)
        temb = emb.time_embedder(t).to(dtype)
        proj = emb.time_proj(emb.act_fn(temb))
        return temb.view(batch, -1, temb.shape[-1]), proj.view(batch, -1, 6, temb.shape[-1])

    def _run_blocks(self, hidden_states, text, timestep_proj, rotary_emb, attention_mask, kv_cache, plan, update):
        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
        for i, block in enumerate(self.blocks):
            layer = kv_cache.layer(i, plan) if kv_cache is not None else None
            args = (hidden_states, text, timestep_proj, rotary_emb, attention_mask, layer, update)
            hidden_states = self._gradient_checkpointing_func(block, *args) if checkpoint else block(*args)
        return hidden_states

    def _head(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        batch, length, dim = hidden_states.shape
        frames = temb.shape[1]
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(3).unbind(2)
        x = self.norm_out(hidden_states.float()).view(batch, frames, length // frames, dim)
        x = (x * (1 + scale) + shift).view(batch, length, dim).type_as(hidden_states)
        return self.proj_out(x)

    def _unpatchify(self, x: torch.Tensor, frames: int, pph: int, ppw: int) -> torch.Tensor:
        p_t, p_h, p_w = self.config.patch_size
        x = x.reshape(x.shape[0], frames, pph, ppw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _mask(self, layout: FrameLayout, tokens_per_frame: int, device, mask_backend: str):
        if not layout.causal:
            return None
        if mask_backend == "auto":
            mask_backend = "flex" if torch.device(device).type == "cuda" else "sdpa"
        if mask_backend == "flex":
            return flex_block_mask(layout, tokens_per_frame, torch.device(device))
        if mask_backend == "sdpa":
            return sdpa_token_mask(layout, tokens_per_frame, torch.device(device))
        raise ValueError(f"mask_backend={mask_backend!r}; use 'auto', 'flex' or 'sdpa'.")

    def _embed_inputs(self, latents: torch.Tensor, frame_timesteps: torch.Tensor, positions: list[int]):
        """Patch embedding, timestep embedding and RoPE tables of a forward over ``latents`` ``[B, C, F, H, W]``:
        ``(hidden_states [B, L, D], temb [B, F_mod, D], timestep_proj [B, F_mod, 6, D], (cos, sin) [1, L, 1, d])``."""
        if frame_timesteps.dtype in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"timesteps in {frame_timesteps.dtype} lose precision (938 becomes 936 in bf16); pass them as float32 "
                "(or integers): the sinusoidal embedding is computed in float32 anyway."
            )
        _, _, _, height, width = latents.shape
        _, p_h, p_w = self.config.patch_size
        rotary_emb = self._rotary(positions, height // p_h, width // p_w, latents.device)
        hidden_states = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj = self._embed_timesteps(frame_timesteps, hidden_states.dtype)
        return hidden_states, temb, timestep_proj, rotary_emb

    def _output(self, hidden_states: torch.Tensor, temb: torch.Tensor, latent_shape) -> torch.Tensor:
        """Output head + unpatchify: ``[B, L, D]`` -> ``[B, C_out, F, H, W]`` for inputs of ``latent_shape``."""
        _, _, frames, height, width = latent_shape
        _, p_h, p_w = self.config.patch_size
        return self._unpatchify(self._head(hidden_states, temb), frames, height // p_h, width // p_w)

    def _forward_frames(
        self,
        latents: torch.Tensor,
        frame_timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        positions: list[int],
        attention_mask: Any = None,
        kv_cache: WanKVCache | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        """Core forward over a packed sequence of latent frames.

        Args:
            latents: ``[B, C, F_seq, H, W]``, the sequence frames in order.
            frame_timesteps: ``[B]`` (one per sample) or ``[B, F_seq]`` (per frame).
            encoder_hidden_states: ``[B, 512, text_dim]`` or ``None`` when ``kv_cache`` holds the text K/V.
            positions: RoPE temporal index of each sequence frame.
        Returns ``[B, C_out, F_seq, H, W]``.
        """
        hidden_states, temb, timestep_proj, rotary_emb = self._embed_inputs(latents, frame_timesteps, positions)
        frames = latents.shape[2]
        text = None
        if kv_cache is None or not kv_cache.has_text:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states is required (the KV cache holds no text K/V yet).")
            text = self.condition_embedder.text_embedder(encoder_hidden_states)
        plan = kv_cache.plan(positions[0], frames, update_cache) if kv_cache is not None else None
        hidden_states = self._run_blocks(
            hidden_states, text, timestep_proj, rotary_emb, attention_mask, kv_cache, plan, update_cache
        )
        if kv_cache is not None and update_cache:
            kv_cache.commit(positions[0], frames)
        return self._output(hidden_states, temb, latents.shape)

    # ------------------------------------------------------------------ public forward modes
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        causal: bool = False,
        frame_offset: int = 0,
        kv_cache: WanKVCache | None = None,
        update_cache: bool = False,
        mask_backend: str = "auto",
    ) -> torch.Tensor | Transformer2DModelOutput:
        r"""Bidirectional, block-causal or KV-cached streaming forward.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, C, F, H, W)`): noisy latents (a whole video, or one chunk when
                streaming).
            timestep (`torch.Tensor` of shape `(B,)` or `(B, F)`): diffusion timestep in [0, 1000], per sample or per
                latent frame.
            encoder_hidden_states (`torch.Tensor` of shape `(B, 512, text_dim)`): UMT5 embeddings. May be `None` when
                streaming once `kv_cache` holds the text K/V.
            causal (`bool`): block-causal attention over the chunks of ``config.num_frames_per_block`` frames (first
                chunk ``config.num_frames_first_block``), honouring ``local_attn_size`` / ``sink_size``.
            frame_offset (`int`): RoPE temporal index of the first frame (streaming: the chunk's first frame).
            kv_cache (`WanKVCache`): streaming mode; the chunk attends to the visible cached history + itself.
            update_cache (`bool`): write this chunk's K/V into the cache (the clean-endpoint pass at t=0, docs/method.md §2).
            mask_backend (`str`): ``"auto"`` (flex on CUDA, SDPA bool mask otherwise), ``"flex"`` or ``"sdpa"``.

        Returns:
            `Transformer2DModelOutput` with `sample` of shape `(B, C, F, H, W)` (flow velocity), or a tuple.
        """
        if encoder_hidden_states_image is not None:
            raise ValueError("encoder_hidden_states_image is not supported: CausalWanTransformer3DModel is text-to-video.")
        if kv_cache is not None and causal:
            raise ValueError("Pass either kv_cache (streaming, one chunk) or causal=True (full sequence), not both.")
        if update_cache and kv_cache is None:
            raise ValueError("update_cache=True needs a kv_cache (see CausalWanTransformer3DModel.new_kv_cache).")
        frames = hidden_states.shape[2]
        positions = list(range(frame_offset, frame_offset + frames))
        mask = None
        if causal:
            cfg = self.config
            layout = FrameLayout.block_causal(
                frames, cfg.num_frames_per_block, cfg.num_frames_first_block, cfg.local_attn_size, cfg.sink_size
            )
            mask = self._mask(layout, self.tokens_per_frame_for(*hidden_states.shape[3:]), hidden_states.device,
                              mask_backend)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        output = self._forward_frames(
            hidden_states, timestep, encoder_hidden_states, positions, mask, kv_cache, update_cache
        )
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    @apply_lora_scale("attention_kwargs")
    def forward_interleaved(
        self,
        noisy_latents: torch.Tensor,
        clean_latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
        mask_backend: str = "auto",
    ) -> torch.Tensor:
        r"""Training-time-test forward on ``[z_1, x_1, z_2, x_2, ..., z_N]`` (Eq. 5).

        Args:
            noisy_latents (`torch.Tensor` of shape `(B, C, F, H, W)`): the noisy state of every chunk (``z_c^u``).
            clean_latents (`torch.Tensor` of shape `(B, C, F, H, W)`): the clean endpoints ``x_c`` (the last chunk's
                frames are ignored: nobody attends to them).
            timestep (`torch.Tensor` of shape `(B,)` or `(B, F)`): the sampling time ``u`` shared by every noisy chunk
                of a sample, or one per latent frame (e.g. per chunk, for teacher forcing with independent noise
                levels); clean tokens get t=0.
            encoder_hidden_states (`torch.Tensor` of shape `(B, 512, text_dim)`).

        Returns:
            `torch.Tensor` of shape `(B, C, F, H, W)`: the flow prediction for the noisy chunks, in video order. With
            gradients enabled, later-chunk losses reach the clean copies' activations (docs/method.md §3.3).
        """
        if noisy_latents.shape != clean_latents.shape:
            raise ValueError(
                f"noisy_latents {tuple(noisy_latents.shape)} and clean_latents {tuple(clean_latents.shape)} must match."
            )
        batch, frames = noisy_latents.shape[0], noisy_latents.shape[2]
        if timestep.shape not in ((batch,), (batch, frames)):
            raise ValueError(f"timestep must have shape (B,)=({batch},) or (B, F)=({batch}, {frames}), got "
                             f"{tuple(timestep.shape)}.")
        cfg = self.config
        layout = FrameLayout.interleaved(
            frames, cfg.num_frames_per_block, cfg.num_frames_first_block, cfg.local_attn_size, cfg.sink_size
        )
        pieces, noisy_index, offset = [], [], 0
        for seg in layout.segments:
            source = noisy_latents if seg.noisy else clean_latents
            pieces.append(source[:, :, seg.frame_start : seg.frame_end])
            if seg.noisy:
                noisy_index.extend(range(offset, offset + seg.num_frames))
            offset += seg.num_frames
        sequence = torch.cat(pieces, dim=2)
        noisy = torch.tensor(layout.noisy_frame_mask(), device=timestep.device)
        per_frame = timestep[:, None].expand(batch, frames) if timestep.ndim == 1 else timestep
        video_frame = torch.tensor(layout.frame_positions(), device=timestep.device)  # sequence frame -> video frame
        frame_timesteps = torch.where(noisy[None, :], per_frame[:, video_frame], torch.zeros_like(per_frame[:, :1]))
        mask = self._mask(layout, self.tokens_per_frame_for(*noisy_latents.shape[3:]), noisy_latents.device,
                          mask_backend)
        out = self._forward_frames(sequence, frame_timesteps, encoder_hidden_states, layout.frame_positions(), mask)
        return out[:, :, torch.tensor(noisy_index, device=out.device)]

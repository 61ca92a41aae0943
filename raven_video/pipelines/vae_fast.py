"""Faster causal 3-D convolutions for the Wan VAE decoder (issue 6: the VAE is half of a streamed video's time).

diffusers' ``WanCausalConv3d.forward`` concatenates the cached frames, then ``F.pad`` copies the whole input to add
the temporal *and* spatial zero padding, then runs ``nn.Conv3d``. cuDNN's 3-D convolutions in bf16 reach a fraction of
what its 2-D ones do on Hopper, so the implementations here keep the activations in ``channels_last_3d`` memory
(physically ``[B, T, H, W, C]``: every frame is an NHWC image, a free view) and compute

- ``"taps2d"``: one NHWC ``conv2d`` per temporal tap, summed: ``y_t = sum_k conv2d(x_{t+k}, W[:, :, k])``;
- ``"stack2d"``: the ``kt`` temporal taps stacked on the channel axis and one ``conv2d`` with ``kt * C`` input
  channels (one GEMM with a longer reduction, at the price of a copy of the input);
- ``"conv3d"``: ``nn.Conv3d`` on ``channels_last_3d`` with the spatial padding done by the kernel, not by a copy.

All of them pad in time exactly as diffusers does (cache frames, then zeros) and leave the math unchanged: the
result equals ``"diffusers"`` up to float summation order (fp32: ~1e-6; bf16: rounding of the tap sum). Only
convolutions with stride 1, dilation 1 and groups 1 are switched (every one of the Wan2.1 decoder's), so encoders are
untouched. Inference only: per-tap weights are cached and re-derived when the weight tensor changes in place.

The other half of the decoder's time is memory-bound pointwise work: each ``WanRMS_norm`` runs in fp32 in several
passes, then SiLU, and ``WanUpsample`` round-trips through fp32. :func:`fuse_decoder_pointwise` replaces every
"RMS norm -> SiLU" pair of the decoder (the residual blocks' two and the head's) by one ``torch.compile``-d kernel
over the channel axis (one read and one write of bf16 instead of about six passes, some in fp32) and upsamples in the
activations' dtype (nearest-neighbour: bit-identical).

    from raven_video.pipelines.vae_fast import fuse_decoder_pointwise, set_causal_conv_impl
    set_causal_conv_impl(pipe.vae, "conv3d")
    fuse_decoder_pointwise(pipe.vae)       # both: pipe.enable_realtime() (vae_conv=..., vae_fuse=...)
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
)


CAUSAL_CONV_IMPLS = ("diffusers", "conv3d", "taps2d", "stack2d")


def _temporal_pad(module: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None) -> torch.Tensor:
    """diffusers' causal time padding: the cached frames first, then zero frames up to ``2 * padding_t``."""
    front = module._padding[4]
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    if front > 0:
        x = torch.cat([x.new_zeros(x.shape[0], x.shape[1], front, *x.shape[3:]), x], dim=2)
    return x.contiguous(memory_format=torch.channels_last_3d)


def _spatial_padding(module: WanCausalConv3d) -> tuple[int, int]:
    return module._padding[2], module._padding[0]  # (h, w)


def _cached_weights(module: WanCausalConv3d, impl: str) -> tuple[torch.Tensor, ...]:
    weight = module.weight
    key = (impl, weight.data_ptr(), weight._version, weight.dtype, weight.device)
    cached = getattr(module, "_raven_fast_weights", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = weight.detach()
    if impl == "taps2d":
        weights = tuple(w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(w.shape[2]))
    elif impl == "stack2d":  # input channel k * C + c  <->  W[:, c, k]
        c_out, c_in, kt, kh, kw = w.shape
        weights = (w.permute(0, 2, 1, 3, 4).reshape(c_out, kt * c_in, kh, kw).contiguous(memory_format=torch.channels_last),)
    else:  # conv3d
        weights = (w.contiguous(memory_format=torch.channels_last_3d),)
    module._raven_fast_weights = (key, weights)
    return weights


def _frames_to_5d(y: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B*T, C, H, W]`` (NHWC memory) -> ``[B, C, T, H, W]`` (``channels_last_3d`` memory), a view."""
    return y.view(batch, -1, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _forward_taps2d(self: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    x = _temporal_pad(self, x, cache_x)
    batch, channels, padded_frames, height, width = x.shape
    kt = self.kernel_size[0]
    frames = padded_frames - kt + 1
    per_frame = x.permute(0, 2, 1, 3, 4)  # [B, T', C, H, W], every frame an NHWC image
    out = None
    for k, weight in enumerate(_cached_weights(self, "taps2d")):
        inputs = per_frame[:, k : k + frames].reshape(batch * frames, channels, height, width)
        y = F.conv2d(inputs, weight, self.bias if k == 0 else None, padding=_spatial_padding(self))
        out = y if out is None else out.add_(y)
    return _frames_to_5d(out, batch)


def _forward_stack2d(self: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    x = _temporal_pad(self, x, cache_x)
    batch, channels, padded_frames, height, width = x.shape
    kt = self.kernel_size[0]
    frames = padded_frames - kt + 1
    nhwc = x.permute(0, 2, 3, 4, 1)  # [B, T', H, W, C], contiguous
    if kt > 1:
        nhwc = torch.cat([nhwc[:, k : k + frames] for k in range(kt)], dim=-1)  # [B, T, H, W, kt*C]
    inputs = nhwc.reshape(batch * frames, height, width, kt * channels).permute(0, 3, 1, 2)
    (weight,) = _cached_weights(self, "stack2d")
    return _frames_to_5d(F.conv2d(inputs, weight, self.bias, padding=_spatial_padding(self)), batch)


def _forward_conv3d(self: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    x = _temporal_pad(self, x, cache_x)
    (weight,) = _cached_weights(self, "conv3d")
    return F.conv3d(x, weight, self.bias, padding=(0, *_spatial_padding(self)))


_FORWARDS = {"taps2d": _forward_taps2d, "stack2d": _forward_stack2d, "conv3d": _forward_conv3d}


def _switchable(module: torch.nn.Module) -> bool:
    return (
        isinstance(module, WanCausalConv3d)
        and tuple(module.stride) == (1, 1, 1)
        and tuple(module.dilation) == (1, 1, 1)
        and module.groups == 1
        and module._padding[1] == module._padding[0]
        and module._padding[3] == module._padding[2]
    )


def set_causal_conv_impl(vae: AutoencoderKLWan, impl: str = "conv3d") -> int:
    r"""
    Switch the causal 3-D convolutions of a Wan VAE's decoder (and ``post_quant_conv``) to ``impl``.

    Args:
        vae: a diffusers ``AutoencoderKLWan``.
        impl: one of ``"diffusers"`` (restore the original forward), ``"conv3d"`` (the fastest on an H100),
            ``"taps2d"``, ``"stack2d"`` (module docstring; ``BENCHMARKS.md`` has their H100 times).

    Returns:
        The number of convolutions switched.
    """
    if impl not in CAUSAL_CONV_IMPLS:
        raise ValueError(f"Unknown causal convolution implementation {impl!r}; choose one of {CAUSAL_CONV_IMPLS}.")
    if not isinstance(vae, AutoencoderKLWan):
        raise TypeError(f"set_causal_conv_impl needs a diffusers AutoencoderKLWan, got {type(vae).__name__}.")
    count = 0
    for module in [vae.post_quant_conv, *vae.decoder.modules()]:
        if not _switchable(module):
            continue
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_raven_fast_weights", None)
        if impl != "diffusers":
            module.forward = types.MethodType(_FORWARDS[impl], module)
        count += 1
    vae._raven_causal_conv_impl = impl
    return count


# ----------------------------------------------------------------------------------------- fused pointwise work


# Row kernels: a channels_last_3d activation [1, C, T, H, W] is physically [T*H*W, C] rows, frames outermost, so
# "normalise over channels" is a per-row reduction and "prepend cached frames" is a concatenation of rows. Each is
# its own function (own compiled code, own recompile budget); rows are dynamic, the channel count static.


def _rows_norm_silu(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(F.normalize(rows + bias, dim=-1) * weight)`` in fp32, rounded once. ``rows``: ``[N, C]``; ``bias``: the
    previous convolution's, added here instead of by the convolution."""
    x = rows.float() if bias is None else rows.float() + bias.float()
    return F.silu(F.normalize(x, dim=-1) * weight).to(rows.dtype)


def _rows_pad_norm_silu(front: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``cat([front, _rows_norm_silu(rows, weight, bias)])``: a causal convolution's input with its cached frames."""
    return torch.cat([front, _rows_norm_silu(rows, weight, bias)], dim=0)


def _rows_residual(rows: torch.Tensor, shortcut: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``rows + bias + shortcut`` (a residual block's output: its last convolution's bias added here)."""
    return (rows.float() + bias.float() + shortcut.float()).to(rows.dtype)


_ROW_KERNELS = {f.__name__: f for f in (_rows_norm_silu, _rows_pad_norm_silu, _rows_residual)}
_COMPILED: dict = {}


def _row_kernel(name: str, compiled: bool, channels: int):
    """The row kernel ``name``, compiled for ``channels`` channels (rows dynamic).

    Each channel count gets its own copy of the function's code object, so each has its own dynamo cache and
    recompile budget (a decoder has 3 channel counts and, per count, graphs for the first and the later frames).
    """
    fn = _ROW_KERNELS[name]
    if not compiled:
        return fn
    key = (name, channels)
    if key not in _COMPILED:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_c{channels}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        _COMPILED[key] = torch.compile(copy, dynamic=None)
    return _COMPILED[key]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B*T*H*W, C]`` rows (free for channels_last_3d; a copy otherwise), marked for
    compilation: the row count dynamic, the channel count static."""
    rows = x.movedim(1, -1).contiguous().view(-1, x.shape[1])
    torch._dynamo.mark_dynamic(rows, 0)
    torch._dynamo.mark_static(rows, 1)
    return rows


def _unrows(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`_rows`: ``[B*T*H*W, C]`` -> ``[B, C, T, H, W]`` in channels_last_3d memory (a view)."""
    return rows.view(batch, -1, height, width, rows.shape[1]).permute(0, 4, 1, 2, 3)


def _norm_weight(norm: WanRMS_norm) -> torch.Tensor:
    """``sqrt(C) * gamma`` as fp32 ``[C]`` (cached until gamma changes)."""
    key = (norm.gamma.data_ptr(), norm.gamma._version, norm.gamma.device)
    cached = norm.__dict__.get("_raven_weight")
    if cached is None or cached[0] != key:
        if torch.is_tensor(norm.bias):  # (the Wan decoder's norms have none)
            raise ValueError("fuse_decoder_pointwise supports WanRMS_norm without bias (the Wan VAE decoder's).")
        weight = norm.gamma.detach().reshape(-1).float() * norm.scale
        torch._dynamo.mark_static(weight, 0)
        cached = norm.__dict__["_raven_weight"] = (key, weight)
    return cached[1]


def _norm_silu(norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))`` for a channel-first ``WanRMS_norm``: one read and one write of ``x`` when compiled."""
    kernel = _row_kernel("_rows_norm_silu", norm.__dict__.get("_raven_compile", False), channels=x.shape[1])
    y = kernel(_rows(x), _norm_weight(norm))
    return _unrows(y, x.shape[0], x.shape[3], x.shape[4])


def _padded_norm_silu(norm: WanRMS_norm, x: torch.Tensor, bias, feat_cache, feat_idx) -> torch.Tensor:
    """The input of a residual block's causal convolution, built in one kernel: ``[cached frames (zeros when there
    are none), silu(norm(x + bias))]`` with ``CACHE_T`` frames in front; updates the cache like diffusers does.

    diffusers keeps the last ``CACHE_T`` frames of the convolution's input; those are the last frames of this padded
    tensor (on a stream's first call a zero frame may lead, which is the zero padding diffusers adds later anyway).
    """
    batch, channels, _, height, width = x.shape
    cached = None if feat_cache is None else feat_cache[feat_idx[0]]
    missing = CACHE_T - (0 if cached is None else cached.shape[2])
    front = cached if missing == 0 else x.new_zeros(batch, channels, missing, height, width).contiguous(
        memory_format=torch.channels_last_3d)
    if cached is not None and missing > 0:
        front = torch.cat([front, cached.to(x.device)], dim=2)
    if bias is not None:
        torch._dynamo.mark_static(bias, 0)
    kernel = _row_kernel("_rows_pad_norm_silu", norm.__dict__.get("_raven_compile", False), channels)
    rows = kernel(_rows(front), _rows(x), _norm_weight(norm), bias)
    padded = _unrows(rows, batch, height, width)
    if feat_cache is not None:
        feat_cache[feat_idx[0]] = padded[:, :, -CACHE_T:].clone()
        feat_idx[0] += 1
    return padded


def _conv_without_bias(conv: WanCausalConv3d, padded: torch.Tensor) -> torch.Tensor:
    (weight,) = _cached_weights(conv, "conv3d")
    return F.conv3d(padded, weight, None, padding=(0, *_spatial_padding(conv)))


def _fused_residual_forward(self: WanResidualBlock, x, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006
    """diffusers' ``WanResidualBlock.forward`` in 5 memory passes: (pad + norm + SiLU), conv, (bias + pad + norm +
    SiLU), conv, (bias + residual). Batch 1 (the streaming decoder's case); other batches use diffusers' forward."""
    if x.shape[0] != 1 or (self.training and self.dropout.p > 0):
        return WanResidualBlock.forward(self, x, feat_cache=feat_cache, feat_idx=feat_idx)
    shortcut = self.conv_shortcut(x)
    y = _conv_without_bias(self.conv1, _padded_norm_silu(self.norm1, x, None, feat_cache, feat_idx))
    y = _conv_without_bias(self.conv2, _padded_norm_silu(self.norm2, y, self.conv1.bias, feat_cache, feat_idx))
    compiled = self.norm1.__dict__.get("_raven_compile", False)
    torch._dynamo.mark_static(self.conv2.bias, 0)
    out = _row_kernel("_rows_residual", compiled, y.shape[1])(_rows(y), _rows(shortcut), self.conv2.bias)
    return _unrows(out, 1, x.shape[3], x.shape[4])


def _fused_head_norm_forward(self: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    return _norm_silu(self, x)  # the decoder's `nonlinearity` that follows is swapped for an Identity


def _native_dtype_upsample_forward(self: WanUpsample, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.Upsample.forward(self, x)  # nearest: copies values, so no fp32 round trip is needed


def fuse_decoder_pointwise(vae: AutoencoderKLWan, enable: bool = True, compile: bool = True) -> int:
    r"""
    Fuse the Wan VAE decoder's "RMS norm -> SiLU" pairs into one kernel and upsample without an fp32 round trip.

    Args:
        vae: a diffusers ``AutoencoderKLWan`` whose decoder uses SiLU (every Wan2.1 VAE).
        enable: ``False`` restores diffusers' forwards.
        compile: run the fused norm + SiLU through ``torch.compile`` (one kernel, dynamic shapes: compiled once);
            ``False`` runs the same math eagerly.

    Returns:
        The number of modules switched. Outputs equal diffusers' up to float rounding (one rounding to bf16 instead
        of two; fp32: ~1e-6).
    """
    if not isinstance(vae, AutoencoderKLWan):
        raise TypeError(f"fuse_decoder_pointwise needs a diffusers AutoencoderKLWan, got {type(vae).__name__}.")
    decoder = vae.decoder
    original = decoder.__dict__.pop("_raven_original_nonlinearity", None)  # a plain attribute, not a submodule
    if original is not None:  # undo a previous call first
        decoder.nonlinearity = original
    modules = [m for m in decoder.modules() if isinstance(m, (WanResidualBlock, WanUpsample))] + [decoder.norm_out]
    norms = [n for n in decoder.modules() if isinstance(n, WanRMS_norm)]
    for module in modules:
        module.__dict__.pop("forward", None)
    for norm in norms:
        norm.__dict__.pop("_raven_compile", None)
        norm.__dict__.pop("_raven_weight", None)
    if not enable:
        return len(modules)
    activations = [decoder.nonlinearity] + [m.nonlinearity for m in modules if isinstance(m, WanResidualBlock)]
    if not all(isinstance(a, torch.nn.SiLU) for a in activations):
        raise ValueError("fuse_decoder_pointwise fuses RMS norm + SiLU; this VAE's decoder uses another activation.")
    for norm in norms:
        norm.__dict__["_raven_compile"] = compile
    for module in modules:
        if isinstance(module, WanResidualBlock):
            module.forward = types.MethodType(_fused_residual_forward, module)
        elif isinstance(module, WanUpsample):
            module.forward = types.MethodType(_native_dtype_upsample_forward, module)
        else:
            module.forward = types.MethodType(_fused_head_norm_forward, module)
    decoder.__dict__["_raven_original_nonlinearity"] = decoder.nonlinearity
    decoder.nonlinearity = torch.nn.Identity()
    return len(modules)

"""A faster decoder for the Wan VAE: :class:`FastWanDecoder`, the same decoding as diffusers' ``WanDecoder3d`` in fewer,
faster kernels (the VAE is about half of a streamed video's time on a GPU).

It is a module of its own that shares the VAE decoder's parameters and follows its causal feature-cache protocol
(``feat_cache`` / ``feat_idx`` / ``first_chunk``), so :class:`~raven_video.pipelines.vae_streaming.StreamingWanDecoder`
drives it in place of ``vae.decoder``; the VAE itself is untouched (``vae.decode`` stays diffusers').

Two levers, each switchable:

* **Causal 3-D convolutions** (``conv_impl``). diffusers' ``WanCausalConv3d.forward`` concatenates the cached frames,
  then ``F.pad`` copies the whole input for the temporal *and* spatial padding, then runs ``nn.Conv3d``. cuDNN's 3-D
  convolutions in bf16 reach a fraction of its 2-D ones on Hopper, so the fast implementations keep activations in
  ``channels_last_3d`` memory (physically ``[B, T, H, W, C]``: each frame a free NHWC view) and compute
  ``"conv3d"``: ``conv3d`` on channels-last with the spatial padding done by the kernel, not a copy;
  ``"taps2d"``: one NHWC ``conv2d`` per temporal tap, summed, ``y_t = sum_k conv2d(x_{t+k}, W[:, :, k])``;
  ``"stack2d"``: the taps stacked on the channel axis and one ``conv2d`` with ``kt * C`` input channels.
  ``"diffusers"`` calls the module's own forward. All pad in time exactly as diffusers does (cached frames, then
  zeros): results equal diffusers' up to summation order (fp32 ~1e-6).
* **Fused pointwise work** (``fuse``). Each ``WanRMS_norm`` runs in fp32 in several passes, then SiLU, and
  ``WanUpsample`` round-trips through fp32. Fused: a residual block's input of each convolution ("cached frames +
  RMS norm + SiLU + the previous convolution's bias") is built in one ``torch.compile``-d row kernel over the channel
  axis, its output ("bias + shortcut") in another, and each upsampling (nearest: copies values) stays in the activation
  dtype, one compiled copy together with the interleave of the time-doubled frames (diffusers copies three times).
  One rounding to bf16 instead of two.

Hand-written because diffusers has no fast or streaming path for this decoder; pinned to diffusers 0.42.1 like
:mod:`~raven_video.pipelines.vae_streaming`.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpBlock,
)

__all__ = ["CAUSAL_CONV_IMPLS", "FastWanDecoder"]

CAUSAL_CONV_IMPLS = ("diffusers", "conv3d", "taps2d", "stack2d")


# ------------------------------------------------------------------------------------ causal convolutions, NHWC
def _temporal_pad(conv: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None) -> torch.Tensor:
    """diffusers' causal time padding: the cached frames first, then zero frames up to ``2 * padding_t``."""
    front = conv._padding[4]
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    if front > 0:
        x = torch.cat([x.new_zeros(x.shape[0], x.shape[1], front, *x.shape[3:]), x], dim=2)
    return x.contiguous(memory_format=torch.channels_last_3d)


def _spatial_padding(conv: WanCausalConv3d) -> tuple[int, int]:
    return conv._padding[2], conv._padding[0]  # (h, w)


def _frames_to_5d(y: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B*T, C, H, W]`` (NHWC memory) -> ``[B, C, T, H, W]`` (``channels_last_3d`` memory), a view."""
    return y.view(batch, -1, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _conv_taps2d(conv, weights, x: torch.Tensor) -> torch.Tensor:
    batch, channels, padded_frames, height, width = x.shape
    frames = padded_frames - conv.kernel_size[0] + 1
    per_frame = x.permute(0, 2, 1, 3, 4)  # [B, T', C, H, W], every frame an NHWC image
    out = None
    for k, weight in enumerate(weights):
        inputs = per_frame[:, k : k + frames].reshape(batch * frames, channels, height, width)
        y = F.conv2d(inputs, weight, conv.bias if k == 0 else None, padding=_spatial_padding(conv))
        out = y if out is None else out.add_(y)
    return _frames_to_5d(out, batch)


def _conv_stack2d(conv, weights, x: torch.Tensor) -> torch.Tensor:
    batch, channels, padded_frames, height, width = x.shape
    kt = conv.kernel_size[0]
    frames = padded_frames - kt + 1
    nhwc = x.permute(0, 2, 3, 4, 1)  # [B, T', H, W, C], contiguous
    if kt > 1:
        nhwc = torch.cat([nhwc[:, k : k + frames] for k in range(kt)], dim=-1)  # [B, T, H, W, kt*C]
    inputs = nhwc.reshape(batch * frames, height, width, kt * channels).permute(0, 3, 1, 2)
    return _frames_to_5d(F.conv2d(inputs, weights[0], conv.bias, padding=_spatial_padding(conv)), batch)


def _conv_conv3d(conv, weights, x: torch.Tensor, bias=True) -> torch.Tensor:
    return F.conv3d(x, weights[0], conv.bias if bias else None, padding=(0, *_spatial_padding(conv)))


def _layout_weights(weight: torch.Tensor, impl: str) -> tuple[torch.Tensor, ...]:
    w = weight.detach()
    if impl == "taps2d":
        return tuple(w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(w.shape[2]))
    if impl == "stack2d":  # input channel k * C + c  <->  W[:, c, k]
        c_out, c_in, kt, kh, kw = w.shape
        return (w.permute(0, 2, 1, 3, 4).reshape(c_out, kt * c_in, kh, kw).contiguous(memory_format=torch.channels_last),)
    return (w.contiguous(memory_format=torch.channels_last_3d),)


def _switchable(conv: torch.nn.Module) -> bool:
    """Stride 1, dilation 1, groups 1, symmetric spatial padding: every convolution of a Wan2.1 decoder."""
    return (
        isinstance(conv, WanCausalConv3d)
        and tuple(conv.stride) == (1, 1, 1)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
        and conv._padding[1] == conv._padding[0]
        and conv._padding[3] == conv._padding[2]
    )


# ------------------------------------------------------------------------------------ fused pointwise row kernels
# A channels_last_3d activation [1, C, T, H, W] is physically [T*H*W, C] rows, frames outermost, so "normalise over
# channels" is a per-row reduction and "prepend cached frames" is a concatenation of rows. Each kernel is its own
# function (own compiled code, own recompile budget); rows are dynamic, the channel count static.
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


def _frames_up2x(x: torch.Tensor, doubled: bool) -> torch.Tensor:
    """``WanResample``'s data movement before its 2-D convolution, as one copy: ``x`` ``[B, C', T, H, W]`` -> frames
    ``[B*T', C, 2H, 2W]`` in channels-last memory, upsampled nearest 2x (``nearest-exact`` at 2x reads source pixel
    ``i // 2``). ``doubled``: ``x`` is the time convolution's output (``C' = 2C``, ``T' = 2T``); its two channel halves
    are frames ``2t`` and ``2t + 1`` (diffusers' ``reshape(b, 2, c, ...)`` then ``stack(..., 3)``).

    diffusers (and the unfused path) copy three times: the frame interleave, the move of frames to the batch axis and
    PyTorch's nearest-upsampling kernel; compiled, this is one pointwise kernel."""
    b, channels, t, h, w = x.shape
    if doubled:
        c = channels // 2
        z = x.reshape(b, 2, c, t, h, w).permute(0, 3, 1, 4, 5, 2)  # [B, T, 2, H, W, C]
        z = z[:, :, :, :, None, :, None, :].expand(b, t, 2, h, 2, w, 2, c)
        frames = b * t * 2
    else:
        c = channels
        z = x.permute(0, 2, 3, 4, 1)[:, :, :, None, :, None, :].expand(b, t, h, 2, w, 2, c)  # [B, T, H, 2, W, 2, C]
        frames = b * t
    return z.reshape(frames, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def _is_nearest_2x(upsample: torch.nn.Module) -> bool:
    """Whether ``upsample`` is Wan's: ``nn.Upsample`` nearest (or nearest-exact) 2x, which :func:`_frames_up2x` does."""
    if not isinstance(upsample, torch.nn.Upsample) or upsample.size is not None:
        return False
    scale = upsample.scale_factor
    scale = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    return upsample.mode in ("nearest", "nearest-exact") and tuple(float(f) for f in scale) == (2.0, 2.0)


_ROW_KERNELS = {f.__name__: f for f in (_rows_norm_silu, _rows_pad_norm_silu, _rows_residual, _frames_up2x)}
_COMPILED: dict = {}


def _row_kernel(name: str, compiled: bool, channels: int):
    """The kernel ``name`` (a row kernel, or :func:`_frames_up2x`), compiled for ``channels`` channels (rows or
    frames dynamic).

    Each channel count gets its own copy of the function's code object, so each has its own dynamo cache and
    recompile budget (a decoder has a few channel counts per kernel and, per count, graphs for the first and the later
    frames).
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


# ------------------------------------------------------------------------------------ the decoder
class FastWanDecoder(torch.nn.Module):
    r"""
    The decoder of a diffusers ``AutoencoderKLWan`` (Wan2.1 layout) with fast causal convolutions and fused pointwise
    work; same call as ``vae.decoder``: ``(x, feat_cache, feat_idx, first_chunk) -> frames``.

    Args:
        vae: the VAE whose decoder (parameters, device, dtype) is used; it is not modified.
        conv_impl: ``"conv3d"`` (the fastest on an H100), ``"taps2d"``, ``"stack2d"`` or ``"diffusers"`` (module
            docstring); convolutions that are not stride-1 / groups-1 stay diffusers'.
        fuse: fused norm + SiLU (+ bias, + residual) row kernels and native-dtype upsampling.
        compile: run the row kernels through ``torch.compile`` (one kernel each, dynamic rows; compiled once per
            channel count); ``False`` runs the same math eagerly.

    Inference only (no gradients are needed through it): per-layout convolution weights are cached and re-derived
    when a weight tensor changes in place.

    Example::

        decoder = StreamingWanDecoder(pipe.vae, decoder=FastWanDecoder(pipe.vae))   # or pipe.enable_realtime()
    """

    def __init__(self, vae: AutoencoderKLWan, conv_impl: str = "conv3d", fuse: bool = True, compile: bool = True):
        super().__init__()
        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"FastWanDecoder needs a diffusers AutoencoderKLWan, got {type(vae).__name__}.")
        if conv_impl not in CAUSAL_CONV_IMPLS:
            raise ValueError(f"Unknown causal convolution implementation {conv_impl!r}; choose one of "
                             f"{CAUSAL_CONV_IMPLS}.")
        decoder = vae.decoder
        if not all(isinstance(block, WanUpBlock) for block in decoder.up_blocks):
            raise ValueError("FastWanDecoder supports the Wan2.1 decoder layout (WanUpBlock); this VAE's decoder uses "
                             "residual up-blocks (Wan2.2). Use vae.decoder.")
        if fuse:
            activations = [decoder.nonlinearity] + [m.nonlinearity for m in decoder.modules()
                                                    if isinstance(m, WanResidualBlock)]
            if not all(isinstance(a, torch.nn.SiLU) for a in activations):
                raise ValueError("fuse=True fuses RMS norm + SiLU; this VAE's decoder uses another activation.")
            if any(torch.is_tensor(n.bias) for n in decoder.modules() if isinstance(n, WanRMS_norm)):
                raise ValueError("fuse=True supports WanRMS_norm without bias (the Wan VAE decoder's).")
        self.decoder = decoder  # shared, not copied: the VAE's own parameters
        self.conv_impl, self.fuse, self.compile = conv_impl, fuse, compile
        self._weights: dict = {}  # conv -> (version key, weights in the impl's layout)
        self._norm_weights: dict = {}  # norm -> (version key, sqrt(C) * gamma as fp32 [C])

    @property
    def num_fast_convs(self) -> int:
        """Causal convolutions that run the fast implementation (0 for ``"diffusers"``)."""
        return 0 if self.conv_impl == "diffusers" else sum(_switchable(m) for m in self.decoder.modules())

    # ----------------------------------------------------------------------------------------- convolutions
    def _conv_weights(self, conv: WanCausalConv3d, impl: str) -> tuple[torch.Tensor, ...]:
        weight = conv.weight
        key = (impl, weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self._weights.get(conv)
        if cached is None or cached[0] != key:
            cached = self._weights[conv] = (key, _layout_weights(weight, impl))
        return cached[1]

    def causal_conv(self, conv: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(x, cache_x)`` with this decoder's implementation."""
        if self.conv_impl == "diffusers" or not _switchable(conv):
            return conv(x, cache_x)
        padded = _temporal_pad(conv, x, cache_x)
        weights = self._conv_weights(conv, self.conv_impl)
        if self.conv_impl == "taps2d":
            return _conv_taps2d(conv, weights, padded)
        if self.conv_impl == "stack2d":
            return _conv_stack2d(conv, weights, padded)
        return _conv_conv3d(conv, weights, padded)

    def _cached_conv(self, conv, x, feat_cache, feat_idx) -> torch.Tensor:
        """A causal convolution with diffusers' cache protocol: keep the last ``CACHE_T`` input frames (one frame
        from the previous call when the input has one) in ``feat_cache[feat_idx]``, then advance ``feat_idx``."""
        if feat_cache is None:
            return self.causal_conv(conv, x)
        idx = feat_idx[0]
        cache_x = x[:, :, -CACHE_T:].clone()
        if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
            cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
        out = self.causal_conv(conv, x, feat_cache[idx])
        feat_cache[idx] = cache_x
        feat_idx[0] += 1
        return out

    # ----------------------------------------------------------------------------------------- blocks
    def _norm_weight(self, norm: WanRMS_norm) -> torch.Tensor:
        key = (norm.gamma.data_ptr(), norm.gamma._version, norm.gamma.device)
        cached = self._norm_weights.get(norm)
        if cached is None or cached[0] != key:
            weight = norm.gamma.detach().reshape(-1).float() * norm.scale
            torch._dynamo.mark_static(weight, 0)
            cached = self._norm_weights[norm] = (key, weight)
        return cached[1]

    def _norm_silu(self, norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
        """``silu(norm(x))``: one read and one write of ``x`` when compiled."""
        kernel = _row_kernel("_rows_norm_silu", self.compile, channels=x.shape[1])
        return _unrows(kernel(_rows(x), self._norm_weight(norm)), x.shape[0], x.shape[3], x.shape[4])

    def _padded_norm_silu(self, norm, x, bias, feat_cache, feat_idx) -> torch.Tensor:
        """A residual convolution's input in one kernel: ``[cached frames (zeros when there are none),
        silu(norm(x + bias))]`` with ``CACHE_T`` frames in front; updates the cache like diffusers does (its last
        ``CACHE_T`` frames are the convolution input's; on a stream's first call a zero frame may lead, which is the
        zero padding diffusers adds anyway)."""
        batch, channels, _, height, width = x.shape
        cached = None if feat_cache is None else feat_cache[feat_idx[0]]
        missing = CACHE_T - (0 if cached is None else cached.shape[2])
        front = cached if missing == 0 else x.new_zeros(batch, channels, missing, height, width).contiguous(
            memory_format=torch.channels_last_3d)
        if cached is not None and missing > 0:
            front = torch.cat([front, cached.to(x.device)], dim=2)
        if bias is not None:
            torch._dynamo.mark_static(bias, 0)
        kernel = _row_kernel("_rows_pad_norm_silu", self.compile, channels)
        padded = _unrows(kernel(_rows(front), _rows(x), self._norm_weight(norm), bias), batch, height, width)
        if feat_cache is not None:
            feat_cache[feat_idx[0]] = padded[:, :, -CACHE_T:].clone()
            feat_idx[0] += 1
        return padded

    def _residual(self, block: WanResidualBlock, x, feat_cache, feat_idx) -> torch.Tensor:
        if not self.fuse or x.shape[0] != 1 or (block.training and block.dropout.p > 0):
            # diffusers' order of operations with this decoder's convolutions (the fused path is written for the
            # streaming decoder's batch of 1)
            shortcut = block.conv_shortcut(x) if isinstance(block.conv_shortcut, torch.nn.Identity) else \
                self.causal_conv(block.conv_shortcut, x)
            x = self._cached_conv(block.conv1, block.nonlinearity(block.norm1(x)), feat_cache, feat_idx)
            x = block.dropout(block.nonlinearity(block.norm2(x)))
            return self._cached_conv(block.conv2, x, feat_cache, feat_idx) + shortcut
        shortcut = block.conv_shortcut(x) if isinstance(block.conv_shortcut, torch.nn.Identity) else \
            self.causal_conv(block.conv_shortcut, x)
        padded = self._padded_norm_silu(block.norm1, x, None, feat_cache, feat_idx)
        y = _conv_conv3d(block.conv1, self._conv_weights(block.conv1, "conv3d"), padded, bias=False)
        padded = self._padded_norm_silu(block.norm2, y, block.conv1.bias, feat_cache, feat_idx)
        y = _conv_conv3d(block.conv2, self._conv_weights(block.conv2, "conv3d"), padded, bias=False)
        torch._dynamo.mark_static(block.conv2.bias, 0)
        out = _row_kernel("_rows_residual", self.compile, y.shape[1])(_rows(y), _rows(shortcut), block.conv2.bias)
        return _unrows(out, 1, x.shape[3], x.shape[4])

    def _upsample(self, resample: WanResample, x, feat_cache, feat_idx) -> torch.Tensor:
        """``WanResample`` in an up mode: for ``upsample3d`` a causal time convolution doubles the frames (on a
        stream's first call the cache slot only records that it started, so the single first frame is not doubled),
        then nearest 2x spatial upsampling and a 3x3 convolution per frame."""
        b, c, t, h, w = x.shape
        doubled = False
        if resample.mode == "upsample3d" and feat_cache is not None:
            idx = feat_idx[0]
            if feat_cache[idx] is None:
                feat_cache[idx] = "Rep"  # diffusers' marker: the stream has begun, no frames cached yet
            else:
                cache_x = x[:, :, -CACHE_T:].clone()
                if cache_x.shape[2] < 2:
                    previous = feat_cache[idx]
                    front = torch.zeros_like(cache_x) if isinstance(previous, str) else \
                        previous[:, :, -1:].to(cache_x.device)
                    cache_x = torch.cat([front, cache_x], dim=2)
                x = self.causal_conv(resample.time_conv, x, None if isinstance(feat_cache[idx], str)
                                     else feat_cache[idx])
                feat_cache[idx] = cache_x
                doubled = True
            feat_idx[0] += 1
        elif resample.mode not in ("upsample2d", "upsample3d"):
            raise ValueError(f"FastWanDecoder decodes; a {resample.mode!r} resample belongs to an encoder.")
        upsample, conv = resample.resample
        if self.fuse and _is_nearest_2x(upsample):
            # nearest-neighbour upsampling copies values: in the activation dtype it is bit-identical to diffusers'
            # fp32 round trip, and the frame interleave and the upsampling are one copy
            frames = _row_kernel("_frames_up2x", self.compile, x.shape[1])(x, doubled)
        else:
            if doubled:
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
            frames = upsample(x.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w))
        t = frames.shape[0] // b
        frames = conv(frames)
        return frames.view(b, t, frames.size(1), frames.size(2), frames.size(3)).permute(0, 2, 1, 3, 4)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, feat_cache=None, feat_idx=None, first_chunk: bool = False) -> torch.Tensor:
        """``WanDecoder3d.forward``: latents ``[B, z_dim, f, h, w]`` (after ``post_quant_conv``) -> frames."""
        feat_idx = [0] if feat_idx is None else feat_idx
        d = self.decoder
        x = self._cached_conv(d.conv_in, x, feat_cache, feat_idx)
        x = self._residual(d.mid_block.resnets[0], x, feat_cache, feat_idx)
        for attention, resnet in zip(d.mid_block.attentions, d.mid_block.resnets[1:]):
            x = self._residual(resnet, attention(x), feat_cache, feat_idx)
        for up_block in d.up_blocks:
            for resnet in up_block.resnets:
                x = self._residual(resnet, x, feat_cache, feat_idx)
            if up_block.upsamplers is not None:
                x = self._upsample(up_block.upsamplers[0], x, feat_cache, feat_idx)
        x = self._norm_silu(d.norm_out, x) if self.fuse else d.nonlinearity(d.norm_out(x))
        return self._cached_conv(d.conv_out, x, feat_cache, feat_idx)

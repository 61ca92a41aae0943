# Copyright 2026 The RAVEN-video authors. Apache-2.0.
"""A cheap *preview* decoder for Wan latents: the decoder of TAEHV (`taew2_1` weights), written from scratch.

Other strides and widths (e.g. for the world VAE's 4x spatial compression) are constructor arguments; such decoders
are distilled from a VAE by `train_preview_decoder.py` and saved as diffusers model folders.

TAEHV ("Tiny AutoEncoder for Hunyuan Video", madebyollin/taehv) is a small 2-D convolutional video autoencoder with
per-block temporal memory. Its `taew2_1` weights (MIT licence, like the upstream code) decode Wan2.1 latents
(16 channels, 8x spatial, 4x temporal compression) far faster and in far less memory than the Wan VAE, at lower
quality: good for live previews. Hand-written because no PyPI package ships TAEHV as an importable library (upstream
is a single script); this file re-implements the decoder from its published description, no upstream code is copied.

Architecture (`nn.Sequential`, index = position; base variant, widths `[256, 128, 64, 64]`, time upscale
`(1, 2, 2)`)::

     0 Clamp  tanh(x/3)*3            1 Conv3x3 16->256 (+bias)   2 ReLU
     3-5  MemBlock(256)              6 Upsample x2 (nearest)     7 TGrow(256, stride 1)   8 Conv3x3 256->128
     9-11 MemBlock(128)             12 Upsample x2              13 TGrow(128, stride 2)  14 Conv3x3 128->64
    15-17 MemBlock(64)              18 Upsample x2              19 TGrow(64, stride 2)   20 Conv3x3 64->64
    21 ReLU                         22 Conv3x3 64->3 (+bias)

`MemBlock(n)`: `relu(conv(cat[x, past]) + x)` with `conv = Conv3x3 2n->n, ReLU, Conv3x3, ReLU, Conv3x3`, where
`past` is the block's input at the previous time step (zeros at the stream's first step). `TGrow(n, s)`: a 1x1 conv
`n -> n*s` (no bias) whose channels split into `s` consecutive frames. Each block runs on all frames of a chunk at
once; carrying every MemBlock's last input frame across chunks makes chunked decoding equal one-shot decoding.

Key layout: the official `taew2_1` state dict (`.pth` or `.safetensors`) holds `encoder.*` and `decoder.*` keys.
[`TAEHVDecoder`] nests its blocks under the attribute `decoder`, so its own `state_dict()` keys are *exactly* the
official decoder keys, prefix included (64 tensors), e.g. `decoder.1.weight` `[256, 16, 3, 3]`,
`decoder.3.conv.0.weight` `[256, 512, 3, 3]`, `decoder.7.conv.weight` `[256, 256, 1, 1]`,
`decoder.13.conv.weight` `[256, 128, 1, 1]`, `decoder.22.bias` `[3]`. [`TAEHVDecoder.from_state_dict`] keeps the
`decoder.*` keys of a full official state dict and ignores the `encoder.*` ones.

Latent scaling: TAEHV applies no scale or shift; it decodes the latents *as the diffusion model sees them*, i.e. the
Wan pipeline's **normalised** latents `(z - latents_mean) / latents_std` (upstream's diffusers demo swaps it in as
the pipeline's VAE with `latents_mean = 0`, `latents_std = 1`, so the pipeline hands it the transformer's latents
unchanged). So [`TAEHVDecoder.decode`] takes the pipeline's latents directly; [`TAEHVDecoder.decode_raw`] takes raw
`AutoencoderKLWan` latents (e.g. from `vae.encode`) and normalises them first.

Frames: each latent frame grows to 4 frames (two TGrow stride-2 blocks); the stream's first 3 frames are warm-up and
dropped, so `F` latent frames give `4F - 3 = 1 + 4(F - 1)` frames, as the Wan VAE. Streaming: the first chunk of `f`
latent frames gives `4f - 3` frames, every later chunk `4f`, exactly as
[`~raven_video.pipelines.vae_streaming.StreamingWanDecoder`]. Output frames are in [-1, 1] (TAEHV's [0, 1] clamp,
mapped), layout `[B, 3, F_px, 8H, 8W]` like `AutoencoderKLWan.decode(...).sample`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["TAEHVDecoder", "TAEHVStreamingDecoder"]

LATENT_CHANNELS = 16
WIDTHS = (256, 128, 64, 64)
TIME_STRIDES = (1, 2, 2)  # TGrow strides of the three stages (taew2_1: no time upscale in the first)
SPACE_STRIDES = (2, 2, 2)  # nearest-neighbour upsampling of the three stages (taew2_1: 8x)


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _Clamp(nn.Module):
    """Soft clamp of the input latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _MemBlock(nn.Module):
    """Residual block that also sees its own input at the previous time step (`past`)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(2 * n, n), nn.ReLU(), _conv3x3(n, n), nn.ReLU(), _conv3x3(n, n))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class _TGrow(nn.Module):
    """Temporal upsampling: a 1x1 conv to `stride` times the channels, split into `stride` consecutive frames."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B*T, C, H, W] -> [B*T*stride, C, H, W]
        # = self.conv(x), as a matmul over channels: oneDNN's 1x1 conv rounds differently for different numbers of
        # frames on the CPU, which would make chunked decoding differ from one-shot decoding in the last bits
        y = torch.einsum("oc,nchw->nohw", self.conv.weight[:, :, 0, 0], x)
        return y.reshape(-1, *x.shape[1:])


class TAEHVDecoder(ModelMixin, ConfigMixin):
    r"""
    TAEHV's decoder. The defaults are `taew2_1`'s (Wan2.1 latents); build that one with [`from_state_dict`] or
    [`from_file`]. Other sizes (e.g. the world VAE's 4x spatial compression: `space_strides=(1, 2, 2)`) are trained by
    `train_preview_decoder.py` and saved / loaded as a diffusers model folder (`save_pretrained` /
    `from_pretrained`: `config.json` + safetensors). The plain constructor gives PyTorch's default initialisation.

    Args:
        latent_channels: channels of the latents (16 for Wan2.1).
        widths: channels of the three stages and of the last conv (`taew2_1`: 256, 128, 64, 64).
        time_strides: frames each stage's TGrow makes of one (`taew2_1`: 1, 2, 2, i.e. 4x).
        space_strides: each stage's nearest-neighbour upsampling, 1 or 2 (`taew2_1`: 2, 2, 2, i.e. 8x); a stage with
            stride 1 keeps its index in the block list (an identity), so the key layout does not change.

    Example:

    ```py
    preview = TAEHVDecoder.from_file("taew2_1.safetensors").to("cuda", torch.float16)
    video = preview.decode(latents)  # pipeline (normalised) latents [B, 16, F, h, w] -> [B, 3, 4F-3, 8h, 8w]
    ```
    """

    @register_to_config
    def __init__(self, latent_channels: int = LATENT_CHANNELS, widths: Sequence[int] = WIDTHS,
                 time_strides: Sequence[int] = TIME_STRIDES, space_strides: Sequence[int] = SPACE_STRIDES):
        super().__init__()
        if len(widths) != 4 or len(time_strides) != 3 or len(space_strides) != 3:
            raise ValueError(f"widths={tuple(widths)}, time_strides={tuple(time_strides)}, space_strides="
                             f"{tuple(space_strides)}: give 4 widths and 3 strides of each kind (three stages).")
        if any(s not in (1, 2) for s in space_strides) or any(s < 1 for s in time_strides):
            raise ValueError(f"space_strides={tuple(space_strides)} must be 1 or 2 and time_strides="
                             f"{tuple(time_strides)} >= 1.")
        blocks: list[nn.Module] = [_Clamp(), _conv3x3(latent_channels, widths[0]), nn.ReLU()]
        for stage, (stride, up) in enumerate(zip(time_strides, space_strides)):
            n = widths[stage]
            blocks += [_MemBlock(n), _MemBlock(n), _MemBlock(n),
                       nn.Upsample(scale_factor=2) if up == 2 else nn.Identity(), _TGrow(n, stride)]
            blocks.append(_conv3x3(n, widths[stage + 1], bias=False))
        blocks += [nn.ReLU(), _conv3x3(widths[-1], 3)]
        self.decoder = nn.Sequential(*blocks)  # attribute name = the official key prefix "decoder."
        self.latent_channels = latent_channels
        self.spatial_compression_ratio = math.prod(space_strides)
        self.temporal_compression_ratio = math.prod(time_strides)
        self.frames_to_trim = self.temporal_compression_ratio - 1  # warm-up frames at the start of a stream

    # ------------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> TAEHVDecoder:
        """Build from an official TAEHV state dict (`taew2_1`): keeps the `decoder.*` keys, ignores `encoder.*`."""
        model = cls()  # taew2_1's architecture
        expected = model.state_dict()
        found = {k: v for k, v in state_dict.items() if k.startswith("decoder.")}
        missing = [k for k in expected if k not in found]
        unexpected = [k for k in found if k not in expected]
        wrong = [
            f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in found and found[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            parts = [f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                     for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes", wrong)) if keys]
            raise ValueError(f"not a taew2_1 TAEHV decoder state dict ({len(found)} 'decoder.' keys, expected "
                             f"{len(expected)}): {'; '.join(parts)}")
        model.load_state_dict(found)
        return model

    @classmethod
    def from_file(cls, path: str | os.PathLike, allow_pickle: bool = False) -> TAEHVDecoder:
        """Load `taew2_1.safetensors`, or a folder saved by `save_pretrained` (any architecture, e.g. the world's);
        a `.pth` (pickle) file only with `allow_pickle=True`, then read with `torch.load(weights_only=True)`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls.from_pretrained(path)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return cls.from_state_dict(load_file(path, device="cpu"))
        if not allow_pickle:
            raise ValueError(f"{path} is not a .safetensors file; loading a pickle (.pth) checkpoint needs "
                             "allow_pickle=True (it is then read with torch.load(weights_only=True)); better, use "
                             "taew2_1.safetensors.")
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------------------------------------- decoding

    def run_blocks(self, latents: torch.Tensor, memory: list[torch.Tensor | None]) -> torch.Tensor:
        """Run the decoder on all latent frames of a chunk at once, *without* trimming.

        Args:
            latents: `[B, 16, f, h, w]` (normalised latents) in the module's dtype and device.
            memory: one entry per block (`len(self.decoder)`), the MemBlocks' last input frame `[B, 1, C, H, W]` of
                the previous chunk, or `None` at a stream's start; updated in place.

        Returns:
            `[B, 3, 4f, 8h, 8w]` raw frames (TAEHV's [0, 1] scale, unclamped).
        """
        batch = latents.shape[0]
        x = latents.transpose(1, 2).flatten(0, 1)  # [B*f, C, h, w], frames of one video contiguous
        for i, block in enumerate(self.decoder):
            if isinstance(block, _MemBlock):
                seq = x.unflatten(0, (batch, -1))  # [B, T, C, H, W]
                prev = memory[i] if memory[i] is not None else torch.zeros_like(seq[:, :1])
                past = torch.cat([prev, seq[:, :-1]], dim=1).flatten(0, 1)
                memory[i] = seq[:, -1:].clone()
                x = block(x, past)
            else:
                x = block(x)
        return x.unflatten(0, (batch, -1)).transpose(1, 2)

    @staticmethod
    def _to_output(frames: torch.Tensor) -> torch.Tensor:
        return frames.clamp(0, 1).mul(2).sub(1)

    def _prepare(self, latents: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(latents) or latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"`latents` must be a tensor of shape [B, {self.latent_channels}, f, h, w], got {shape}.")
        if 0 in latents.shape:
            raise ValueError(f"`latents` of shape {tuple(latents.shape)} is empty.")
        weight = self.decoder[1].weight
        return latents.to(weight.device, weight.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pipeline (normalised) latents `[B, 16, F, h, w]` -> frames `[B, 3, 4F - 3, 8h, 8w]` in [-1, 1]."""
        memory: list[torch.Tensor | None] = [None] * len(self.decoder)
        frames = self.run_blocks(self._prepare(latents), memory)
        return self._to_output(frames[:, :, self.frames_to_trim:])

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)

    def decode_raw(self, latents: torch.Tensor, latents_mean: Sequence[float] | torch.Tensor,
                   latents_std: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Raw `AutoencoderKLWan` latents (e.g. `vae.encode` output; `vae.config.latents_mean/std`) -> frames:
        normalises with `(z - mean) / std` first, then [`decode`]."""
        mean = torch.as_tensor(latents_mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.as_tensor(latents_std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1, 1)
        return self.decode((latents - mean) / std)


class TAEHVStreamingDecoder:
    r"""
    Decode latents chunk by chunk with a [`TAEHVDecoder`], equal to decoding them all at once.

    Drop-in for [`~raven_video.pipelines.vae_streaming.StreamingWanDecoder`] in a chunk loop: same calls
    (`decode_chunk`, `reset`, `started`, `num_latent_frames`, `num_frames`), same input (normalised latents), same
    per-chunk frame counts (`4f - 3` for the stream's first chunk of `f` latent frames, `4f` afterwards), output
    `[B, 3, F_px, 8h, 8w]` in [-1, 1] in the decoder's dtype and device. One stream at a time; [`reset`] between.

    The frames equal [`TAEHVDecoder.decode`] of the whole video: bit for bit on the CPU in fp32 as long as each chunk
    has `B * f >= 2` (oneDNN runs a single-image 3x3 convolution with another kernel: then within fp32 rounding).
    """

    def __init__(self, decoder: TAEHVDecoder):
        if not isinstance(decoder, TAEHVDecoder):
            raise TypeError(f"TAEHVStreamingDecoder needs a TAEHVDecoder, got {type(decoder).__name__}.")
        self.decoder = decoder
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next [`decode_chunk`] starts a new video."""
        self._memory: list[torch.Tensor | None] = [None] * len(self.decoder.decoder)
        self._shape: tuple[int, int, int] | None = None
        self.num_latent_frames = 0
        self.num_frames = 0

    @property
    def started(self) -> bool:
        return self.num_latent_frames > 0

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Next `f >= 1` normalised latent frames `[B, 16, f, h, w]` -> `[B, 3, 4f (- 3 if first), 8h, 8w]`."""
        latents = self.decoder._prepare(latents)
        batch, _, frames, height, width = latents.shape
        if self._shape is not None and (batch, height, width) != self._shape:
            raise ValueError(f"Chunk of shape {tuple(latents.shape)} does not continue the stream of batch size "
                             f"{self._shape[0]} and latent size {self._shape[1]}x{self._shape[2]}; call `reset()`.")
        self._shape = (batch, height, width)
        raw = self.decoder.run_blocks(latents, self._memory)
        trim = self.decoder.frames_to_trim if self.num_latent_frames == 0 else 0
        out = self.decoder._to_output(raw[:, :, trim:])
        self.num_latent_frames += frames
        self.num_frames += out.shape[2]
        return out

# Copyright 2026 The RAVEN-video authors. Apache-2.0.
"""Streaming (chunk-by-chunk) decoding for diffusers' `AutoencoderKLWan`, bit-exact with one-shot `vae.decode`.

`AutoencoderKLWan.decode` resets its causal-convolution cache at the start and at the end of every call, so decoding a
video chunk by chunk through it yields the wrong frame count and seams at chunk borders. Its decoder, however, is
causal in time and is driven one latent frame at a time with an explicit feature cache (`feat_cache`/`feat_idx`).
[`StreamingWanDecoder`] keeps that cache alive across chunks, which reproduces `AutoencoderKLWan._decode` frame for
frame (diffusers 0.42.1): `post_quant_conv` (a 1x1x1 conv, so per-chunk == whole-video), then `vae.decoder` on each
latent frame with `first_chunk=True` only for the stream's very first frame, then (Wan2.2) `unpatchify`, then
`clamp(-1, 1)`.

Hand-written because diffusers has no public streaming decode for this VAE. It relies on internals of diffusers'
`autoencoder_kl_wan` module (the decoder's `feat_cache`/`feat_idx`/`first_chunk` arguments, `WanCausalConv3d`,
`unpatchify`); the package pins diffusers==0.42.1 for this reason and the constructor checks those internals.
"""

from __future__ import annotations

import inspect

import torch

import diffusers
from diffusers import AutoencoderKLWan


__all__ = ["PINNED_DIFFUSERS_VERSION", "StreamingWanDecoder", "decode_videos", "denormalize_wan_latents"]

PINNED_DIFFUSERS_VERSION = "0.42.1"

try:  # internals of the pinned diffusers release, checked again in `_check_vae_internals`
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
except ImportError as _err:  # pragma: no cover - only with an unsupported diffusers
    raise ImportError(
        "raven_video.pipelines.vae_streaming needs `WanCausalConv3d` and `unpatchify` from "
        f"diffusers.models.autoencoders.autoencoder_kl_wan (diffusers=={PINNED_DIFFUSERS_VERSION}); the installed "
        f"diffusers {diffusers.__version__} lacks them. Install the pinned version: "
        f"`pip install diffusers=={PINNED_DIFFUSERS_VERSION}`."
    ) from _err


def _internals_error(detail: str) -> RuntimeError:
    return RuntimeError(
        f"StreamingWanDecoder drives internals of AutoencoderKLWan that changed in the installed diffusers "
        f"{diffusers.__version__}: {detail}. It is written for diffusers=={PINNED_DIFFUSERS_VERSION}; install it with "
        f"`pip install diffusers=={PINNED_DIFFUSERS_VERSION}`."
    )


def _check_vae_internals(vae: AutoencoderKLWan) -> None:
    for name in ("decoder", "post_quant_conv", "config"):
        if not hasattr(vae, name):
            raise _internals_error(f"the VAE has no attribute `{name}`")
    params = inspect.signature(vae.decoder.forward).parameters
    for name in ("feat_cache", "feat_idx", "first_chunk"):
        if name not in params:
            raise _internals_error(f"`vae.decoder.forward` has no `{name}` argument")
    for name in ("z_dim", "latents_mean", "latents_std"):
        if name not in vae.config:
            raise _internals_error(f"`vae.config` has no `{name}`")


def denormalize_wan_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    r"""
    Undo the latent normalisation of the Wan pipelines, exactly as `WanPipeline.__call__` does before `vae.decode`:
    `z = z_norm / (1 / std) + mean`, computed in the VAE dtype.

    Args:
        latents (`torch.Tensor` of shape `[B, z_dim, f, h, w]`): normalised latents (what the transformer produces).

    Returns:
        `torch.Tensor` of shape `[B, z_dim, f, h, w]` in `vae.dtype`.
    """
    z_dim = vae.config.z_dim
    latents = latents.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    return latents / inv_std + mean


@torch.no_grad()
def decode_videos(vae: AutoencoderKLWan, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Normalised latents ``[B, C, F, H, W]`` -> videos ``[B, F_px, 3, H_px, W_px]`` float32 clamped to [-1, 1] on the
    CPU (the reward and metric input), decoded ``batch_size`` videos at a time with ``vae.decode``."""
    out = []
    for part in latents.split(batch_size):
        z = denormalize_wan_latents(part.to(vae.device), vae)
        out.append(vae.decode(z, return_dict=False)[0].float().clamp(-1, 1).permute(0, 2, 1, 3, 4).cpu())
    return torch.cat(out)


class StreamingWanDecoder:
    r"""
    Decode Wan latents chunk by chunk as they arrive, bit-exact with decoding the whole video at once.

    The causal-convolution cache lives in this object, not in the VAE: several decoders may share one VAE (e.g. one
    per concurrent stream), and `vae.decode` may be called in between without disturbing a stream. One decoder serves
    one stream at a time; call [`reset`] before starting the next one.

    Frame arithmetic (temporal stride 4): the stream's first latent frame decodes to 1 pixel frame, every later
    latent frame to 4, so a stream of `f` latent frames gives `4 (f - 1) + 1` frames in total, e.g. a first chunk of
    3 latent frames -> 9 frames, later chunks of 3 -> 12 frames each.

    Spatial tiling (`vae.enable_tiling()`) is not supported (its tiles carry separate caches); batch slicing
    (`vae.enable_slicing()`) is mirrored: each batch element keeps its own cache, as `vae.decode` does (equal to fp32
    rounding, not bit for bit: CPU conv kernels round differently on the unaligned batch-slice views `vae.decode`
    passes to `post_quant_conv`). Without slicing the result is bit-identical to `vae.decode`.

    Args:
        vae ([`~diffusers.AutoencoderKLWan`]): the VAE; its weights are used as they are (device, dtype).
        decoder (`torch.nn.Module`, *optional*): what decodes each latent frame in place of `vae.decoder`, with the
            same call and cache protocol, e.g. a [`~raven_video.pipelines.vae_fast.FastWanDecoder`] of this VAE.

    Example:

    ```py
    decoder = StreamingWanDecoder(pipe.vae)
    for latent_chunk in chunks:  # [B, 16, 3, h, w] normalised latents
        frames = decoder.decode_chunk(latent_chunk)  # [B, 3, 9 or 12, 8h, 8w] in [-1, 1]
    decoder.reset()
    ```
    """

    def __init__(self, vae: AutoencoderKLWan, decoder: torch.nn.Module | None = None):
        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(
                f"StreamingWanDecoder needs a diffusers AutoencoderKLWan, got {type(vae).__name__}. Pass `pipe.vae` "
                "of a Wan pipeline."
            )
        _check_vae_internals(vae)
        self.vae = vae
        self.decoder = vae.decoder if decoder is None else decoder
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset()

    # ---------------------------------------------------------------------------------------------------- state

    def reset(self) -> None:
        r"""Forget the stream: the next [`decode_chunk`] starts a new video (its first frame is a "first chunk")."""
        self._feat_maps: list[list] | None = None  # one cache list per batch slice
        self._shape: tuple[int, int, int] | None = None  # (batch, h, w) of the stream
        self.num_latent_frames = 0
        self.num_frames = 0

    @property
    def started(self) -> bool:
        """Whether a stream is in progress (at least one chunk decoded since the last [`reset`])."""
        return self.num_latent_frames > 0

    # --------------------------------------------------------------------------------------------------- decode

    def _validate(self, latents: torch.Tensor) -> None:
        if not torch.is_tensor(latents):
            raise TypeError(
                f"`latents` must be a torch.Tensor of shape [B, C, f, h, w], got {type(latents).__name__}."
            )
        if latents.ndim != 5:
            raise ValueError(
                f"`latents` must have shape [B, {self.vae.config.z_dim}, f, h, w] (5 dims), got shape "
                f"{tuple(latents.shape)}. Add the batch dimension with `latents[None]` if it is missing."
            )
        batch, channels, frames, height, width = latents.shape
        if channels != self.vae.config.z_dim:
            raise ValueError(
                f"`latents` has {channels} channels but the VAE expects z_dim={self.vae.config.z_dim} "
                f"(shape {tuple(latents.shape)}); pass latents in [B, C, f, h, w] layout."
            )
        if frames < 1 or batch < 1 or height < 1 or width < 1:
            raise ValueError(
                f"`latents` of shape {tuple(latents.shape)} is empty; every chunk needs >= 1 latent frame."
            )
        if not latents.is_floating_point():
            raise TypeError(f"`latents` must be a floating-point tensor, got dtype {latents.dtype}.")
        if self._shape is not None and (batch, height, width) != self._shape:
            raise ValueError(
                f"Chunk of shape {tuple(latents.shape)} does not continue the stream of batch size {self._shape[0]} "
                f"and latent size {self._shape[1]}x{self._shape[2]}; call `reset()` to start a new stream."
            )
        if self.vae.use_tiling:
            tile_h = self.vae.tile_sample_min_height // self.vae.spatial_compression_ratio
            tile_w = self.vae.tile_sample_min_width // self.vae.spatial_compression_ratio
            if height > tile_h or width > tile_w:
                raise ValueError(
                    f"Spatial tiling is enabled on the VAE and the latent size {height}x{width} exceeds the tile "
                    f"({tile_h}x{tile_w}); StreamingWanDecoder does not tile. Call `vae.disable_tiling()`."
                )

    def _hook(self) -> None:
        # what `@apply_forward_hook` does for `vae.decode`: lets accelerate's CPU offload move the VAE to its device
        hook = getattr(self.vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.vae)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        r"""
        Decode the next chunk of the stream.

        Args:
            latents (`torch.Tensor` of shape `[B, z_dim, f, h, w]`): the next `f >= 1` *normalised* latent frames (as
                produced by the transformer); de-normalised with `vae.config.latents_mean/std` like `WanPipeline`.

        Returns:
            `torch.Tensor` of shape `[B, 3, F_px, 8h, 8w]`, values in [-1, 1], `vae.dtype`, on the VAE's device, with
            `F_px = 4 f - 3` for the stream's first chunk and `4 f` afterwards.
        """
        self._validate(latents)
        self._hook()
        batch, _, frames, height, width = latents.shape
        slices = batch if (self.vae.use_slicing and batch > 1) else 1
        if self._feat_maps is None:
            self._feat_maps = [[None] * self._num_convs for _ in range(slices)]
            self._shape = (batch, height, width)

        device = self.vae.post_quant_conv.weight.device
        z = denormalize_wan_latents(latents.to(device), self.vae)
        outputs = []
        # with slicing, `vae.decode` runs `_decode` (post_quant_conv included) per batch element: mirror it exactly
        for slice_index, z_slice in enumerate(z.split(1) if slices > 1 else (z,)):
            x_slice = self.vae.post_quant_conv(z_slice)
            feat_map = self._feat_maps[slice_index]
            frames_out = []
            for i in range(frames):
                conv_idx = [0]
                frames_out.append(
                    self.decoder(
                        x_slice[:, :, i : i + 1],
                        feat_cache=feat_map,
                        feat_idx=conv_idx,
                        first_chunk=(self.num_latent_frames + i == 0),
                    )
                )
            outputs.append(torch.cat(frames_out, dim=2))
        out = torch.cat(outputs, dim=0) if slices > 1 else outputs[0]
        if self.vae.config.get("patch_size", None) is not None:
            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        out = torch.clamp(out, min=-1.0, max=1.0)

        self.num_latent_frames += frames
        self.num_frames += out.shape[2]
        return out

    @torch.no_grad()
    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        r"""
        One-shot reference decode (the `WanPipeline` path): de-normalise, then `vae.decode`. Does not touch the
        stream state.

        Args:
            latents (`torch.Tensor` of shape `[B, z_dim, f, h, w]`): normalised latents of a whole video.

        Returns:
            `torch.Tensor` of shape `[B, 3, 4 f - 3, 8h, 8w]`, values in [-1, 1].
        """
        if not torch.is_tensor(latents) or latents.ndim != 5 or latents.shape[1] != self.vae.config.z_dim:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(
                f"`latents` must be a tensor of shape [B, {self.vae.config.z_dim}, f, h, w], got {shape}."
            )
        z = denormalize_wan_latents(latents.to(self.vae.post_quant_conv.weight.device), self.vae)
        return self.vae.decode(z, return_dict=False)[0]

"""Compute floor of streaming generation: the FLOPs of the DiT forwards and the VAE decode of one stream, and the time
they need at a sustained matrix rate (800 TFLOP/s for an H100/H200 in bf16).

``stream_flops`` counts the dense FLOPs of exactly what :class:`~raven_video.CausalWanPipeline` runs: per chunk
``steps`` denoising forwards (queries = the chunk, keys = visible history + the chunk) and one cache pass for every
chunk but the last, plus the Wan VAE decode. ``floor_seconds`` divides by a sustained bf16 rate (800 TFLOP/s on an
H100: an 8192^3 GEMM measured 769-798 here), and the *floor ratio* of a measurement is ``floor / measured``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Wan VAE decoder: 6.775 TMAC per latent frame at 480x832 (flops_wan13b.py), i.e. 13.55 TFLOP; scales with area.
_VAE_FLOP_PER_LATENT_FRAME_480P = 2 * 6.7749986304e12
_AREA_480P = 480 * 832


@dataclass
class StreamFlops:
    dit_tflop: float
    vae_tflop: float
    text_kv_tflop: float

    @property
    def total_tflop(self) -> float:
        return self.dit_tflop + self.vae_tflop + self.text_kv_tflop

    def as_dict(self) -> dict:
        return {**asdict(self), "total_tflop": self.total_tflop}


def stream_flops(
    chunk_frames: list[int],
    tokens_per_frame: int,
    *,
    dim: int = 1536,
    ffn_dim: int = 8960,
    num_layers: int = 30,
    text_len: int = 512,
    steps: int = 4,
    visible_history: list[int] | None = None,
    height: int = 480,
    width: int = 832,
    cfg_branches: int = 1,
) -> StreamFlops:
    """Dense FLOPs of one streamed video.

    Args:
        chunk_frames: latent frames per chunk, e.g. ``[3] * 7``.
        tokens_per_frame: 1560 at 480x832.
        visible_history: latent frames of history each chunk attends to (default: all earlier frames).
        cfg_branches: 2 with student classifier-free guidance.
    """
    per_token = 2 * num_layers * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn_dim)  # self qkvo, cross q/o, ffn
    per_pair = 4 * dim * num_layers  # QK^T and PV, all layers
    dit, start = 0.0, 0
    for c, n in enumerate(chunk_frames):
        history = start if visible_history is None else visible_history[c]
        q = n * tokens_per_frame
        kv = (history + n) * tokens_per_frame
        forward = per_token * q + per_pair * q * kv + per_pair * q * text_len
        passes = steps + (1 if c < len(chunk_frames) - 1 else 0)
        dit += passes * forward
        start += n
    latent_frames = sum(chunk_frames)
    vae = _VAE_FLOP_PER_LATENT_FRAME_480P * latent_frames * (height * width) / _AREA_480P
    text_kv = 2 * num_layers * 2 * dim * dim * text_len
    return StreamFlops(cfg_branches * dit / 1e12, vae / 1e12, cfg_branches * text_kv / 1e12)


def floor_seconds(tflop: float, sustained_tflops: float = 800.0) -> float:
    return tflop / sustained_tflops

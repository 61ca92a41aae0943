"""``CausalWanPipeline``: chunk-by-chunk, KV-cached text-to-video with a few-step consistency sampler.

Inference of ``docs/method.md`` §2 (Alg. 1 l.1-10): encode the prompt once; draw one full-length noise tensor; sample
it chunk by chunk with :class:`~raven_video.sampling.sampler.ChunkSampler` (the 4 consistency steps
``t = [1000, 938, 833, 625]`` of ``FlowMatchLCMScheduler``, shift 5, then one cache pass of the clean chunk at t=0);
decode each chunk as it arrives with a streaming VAE decoder that is bit-exact with one-shot decoding.

``__call__`` returns the whole video like ``WanPipeline``; :meth:`CausalWanPipeline.stream` yields decoded frames
chunk by chunk (their concatenation equals ``__call__``), with optional prompt switches and a LongLive-style local
window + attention sink for streams longer than the training length. :meth:`CausalWanPipeline.enable_realtime` wraps
the sampler's network calls (compile, CUDA graphs) and the decoder (fused kernels, a second CUDA stream) from outside.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchLCMScheduler
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.utils import logging
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from ..models.attention_layout import num_frames_problem, validate_window
from ..models.transformer_causal_wan import CausalWanTransformer3DModel
from ..sampling.flow import DEFAULT_TIMESTEPS, next_timesteps, scheduler_sigmas
from ..sampling.sampler import ChunkSampler, Denoiser, TransformerDenoiser, initial_noise
from . import hub
from .vae_streaming import StreamingWanDecoder

logger = logging.get_logger(__name__)


@dataclass
class StreamChunk:
    """One chunk of a stream.

    Attributes:
        index: chunk index (0-based).
        frames: decoded frames of this chunk, in the ``output_type`` format (``np``: ``[B, F, H, W, 3]`` in [0, 1];
            ``pt``: ``[B, F, 3, H, W]``; ``latent``: ``None``), complete when the chunk is yielded (``seconds`` is
            the time they took).
        latents: the chunk's clean latents ``[B, 16, f, h, w]`` (normalised, as produced by the transformer).
        frame_start: index of the chunk's first pixel frame in the video.
        prompt: the prompt(s) in force for this chunk.
        seconds: wall time since the previous chunk was yielded (the first: since the stream started).
    """

    index: int
    frames: np.ndarray | torch.Tensor | None
    latents: torch.Tensor
    frame_start: int
    prompt: list[str] | None
    seconds: float = 0.0


def _device_exists(device: torch.device) -> bool:
    """A CPU, or a CUDA device this process can see."""
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu"


class _ChunkDecoder:
    """Streaming VAE decode of each chunk, optionally on a side CUDA stream (``submit`` returns at once; ``result``
    waits for that chunk only)."""

    def __init__(self, vae, video_processor, output_type, decoder=None, stream=None, preview=None):
        if preview is not None:  # enable_realtime(preview_decoder=...): TAEHV instead of the Wan VAE
            from .preview_decoder import TAEHVStreamingDecoder

            self.decoder, module = TAEHVStreamingDecoder(preview), preview
        else:
            self.decoder, module = StreamingWanDecoder(vae, decoder=decoder), vae
        self.video_processor, self.output_type, self.stream = video_processor, output_type, stream
        parameter = next(module.parameters())
        # the transformer's device, or a second GPU (enable_realtime(devices=...))
        self.device, self.dtype = parameter.device, parameter.dtype

    @property
    def overlaps(self) -> bool:
        return self.stream is not None

    def defers(self, index: int, device) -> bool:
        """Whether chunk ``index`` is yielded only once the next chunk's transformer work is queued. With a side stream
        every chunk but the first is; the first goes out at once (latency), unless the decode runs on another GPU than
        the transformer's ``device``: waiting for it there would leave the transformer's GPU idle for a whole decode,
        while queueing the next chunk first costs only the host time of queueing it."""
        return self.overlaps and (index > 0 or self.device != torch.device(device))

    def submit(self, clean: torch.Tensor):
        if self.stream is None:
            return self.decoder.decode_chunk(clean.to(self.device, self.dtype))  # [B, 3, F_px, H, W] in [-1, 1]
        if clean.device != self.device:  # another GPU: a small peer copy, ordered after the transformer's work
            clean = clean.to(self.device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            clean.record_stream(self.stream)
            pixels = self.decoder.decode_chunk(clean.to(self.dtype))
            done = torch.cuda.Event()
            done.record(self.stream)
        return pixels, done

    def result(self, handle):
        """The chunk's frames, complete: a CUDA ``pt`` result is waited for, as the other formats are by their host copy."""
        if self.stream is None:
            frames = self.video_processor.postprocess_video(handle, output_type=self.output_type)
            if isinstance(frames, torch.Tensor) and frames.is_cuda:
                torch.cuda.current_stream(frames.device).synchronize()
            return frames
        pixels, done = handle
        done.synchronize()
        # post-processed on the decode's own stream, idle now: the current stream may already hold the next chunk's
        # transformer work, and frames post-processed behind it would be late by a whole chunk
        with torch.cuda.device(pixels.device), torch.cuda.stream(self.stream):
            frames = self.video_processor.postprocess_video(pixels, output_type=self.output_type)
            if isinstance(frames, torch.Tensor):
                self.stream.synchronize()
                frames.record_stream(torch.cuda.current_stream(pixels.device))  # the caller's stream uses them next
        return frames


class _EncodedSchedule(Mapping):
    """``{chunk: prompt}`` seen as ``{chunk: text embeddings}``, encoded when the sampler reaches the chunk (so a
    schedule may still change while a stream runs)."""

    def __init__(self, schedule: Mapping[int, str], encode):
        self.schedule, self.encode = schedule, encode

    def __getitem__(self, index):
        return self.encode([self.schedule[index]])

    def __contains__(self, index):
        return index in self.schedule

    def __iter__(self):
        return iter(self.schedule)

    def __len__(self):
        return len(self.schedule)


class CausalWanPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""Streaming text-to-video with a causal, few-step, KV-cached Wan2.1 transformer (RAVEN).

    Args:
        tokenizer (`T5TokenizerFast` / `PreTrainedTokenizerFast`), text_encoder (`UMT5EncoderModel`),
        vae (`AutoencoderKLWan`), scheduler (`FlowMatchLCMScheduler`, shift 5),
        transformer (`CausalWanTransformer3DModel`).
        denoising_timesteps (`list[int]`, defaults to `[1000, 938, 833, 625]`): the few-step list
            (``docs/method.md`` §1.3).
        fps (`int`, defaults to 16): frame rate of the generated video (metadata for writers).
        height, width (`int`, defaults to 480 x 832): the model's native size, used when a call gives none.
        guidance_scale (`float`, defaults to 1.0): the model's sampling guidance, used when a call gives none (1 =
            unguided, as RAVEN ships; a few-step student may be published with its own CFG).
        max_sequence_length (`int`, defaults to 512): the text length the transformer was trained with (prompt
            embeddings are zero-padded to it), used when a call gives none.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]
    # real-time state, set by `enable_realtime` (plain attributes: not pipeline components or config)
    _realtime_denoiser: Denoiser | None = None  # e.g. CUDA graphs of the streaming calls; None: the eager transformer
    _fast_decoder = None  # FastWanDecoder for the streaming VAE decode; None: diffusers' decoder
    _overlap_decode = False
    _side_stream = None
    _decode_device = None  # enable_realtime(devices=(dit, vae)): the VAE decodes on a second GPU
    _preview_decoder = None  # enable_realtime(preview_decoder=...): a TAEHVDecoder decodes the stream

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchLCMScheduler,
        transformer: CausalWanTransformer3DModel,
        denoising_timesteps: list[int] | tuple[int, ...] = DEFAULT_TIMESTEPS,
        fps: int = 16,
        height: int = 480,
        width: int = 832,
        max_sequence_length: int = 512,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
        )
        timesteps = [int(t) for t in denoising_timesteps]
        try:
            next_timesteps(timesteps)
        except ValueError as err:
            raise ValueError(f"denoising_timesteps: {err} E.g. [1000, 938, 833, 625].") from None
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 1.0):
            raise ValueError(f"guidance_scale={guidance_scale!r} in the pipeline config must be a finite number >= 1 "
                             "(1 = unguided).")
        self.register_to_config(denoising_timesteps=timesteps, fps=int(fps), height=int(height), width=int(width),
                                max_sequence_length=int(max_sequence_length), guidance_scale=float(guidance_scale))
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, *args, **kwargs):
        """UMT5 embeddings zero-padded to ``max_sequence_length`` (``WanPipeline.encode_prompt``, reused as is)."""
        return WanPipeline.encode_prompt(self, *args, **kwargs)

    def _get_t5_prompt_embeds(self, *args, **kwargs):
        return WanPipeline._get_t5_prompt_embeds(self, *args, **kwargs)

    def _encode(self, prompt, negative_prompt, guidance_scale, num_videos_per_prompt, max_sequence_length, device):
        """Prompt embeddings in the transformer's dtype; ``[neg; pos]`` when guided."""
        pos, neg = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
            num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length, device=device,
        )
        text = torch.cat([neg, pos]) if guidance_scale > 1.0 else pos
        return text.to(self.transformer.dtype)

    # ------------------------------------------------------------------ validation
    def check_inputs(self, prompt, negative_prompt, num_frames, height, width, prompt_embeds, guidance_scale,
                     local_attn_size=None, sink_size=None, prompt_schedule=None, num_videos_per_prompt=1,
                     max_sequence_length=512):
        """Validate everything that can fail before any heavy work; errors name the value and the fix."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide a `prompt` (or `prompt_embeds`); got neither.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not prompts:
                raise ValueError(f"prompt={prompt!r}: pass a non-empty string or a non-empty list of strings.")
            for p in prompts:
                if not isinstance(p, str) or not p.strip():
                    raise ValueError(f"prompt={p!r} is empty: every prompt must be a non-empty string.")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list, tuple)):
            raise ValueError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt)}.")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int):
            raise ValueError(f"num_frames={num_frames!r} must be an integer number of frames, e.g. 81.")
        cfg = self.transformer.config
        problem = num_frames_problem(num_frames, cfg.num_frames_per_block, cfg.num_frames_first_block,
                                     self.vae_scale_factor_temporal)
        if problem:
            raise ValueError(f"num_frames={num_frames} {problem}.")
        latent_frames = self.latent_frames(num_frames)
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                fixed = max(multiple, round(int(value) / multiple) * multiple) if isinstance(value, int) else 480
                raise ValueError(f"{name}={value} must be a positive multiple of {multiple}; e.g. {fixed}.")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 1.0):
            raise ValueError(f"guidance_scale={guidance_scale} must be a finite number >= 1 (1 = unguided, the "
                             "released setting).")
        for name, value in (("num_videos_per_prompt", num_videos_per_prompt),
                            ("max_sequence_length", max_sequence_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (defaults: 1 and 512).")
        rope_len = self.transformer.config.rope_max_seq_len
        if latent_frames > rope_len:
            raise ValueError(
                f"num_frames={num_frames} needs {latent_frames} latent frames, beyond the RoPE table of {rope_len} "
                "latent frames. Load the transformer with a larger `rope_max_seq_len` or generate fewer frames."
            )
        if local_attn_size is not None or sink_size is not None:
            validate_window(
                cfg.local_attn_size if local_attn_size is None else local_attn_size,
                cfg.sink_size if sink_size is None else sink_size,
                cfg.num_frames_per_block,
            )
        if prompt_schedule:
            num_chunks = len(self.transformer.chunk_sizes(latent_frames))
            for chunk, text in prompt_schedule.items():
                if not isinstance(chunk, int) or not 0 < chunk < num_chunks:
                    raise ValueError(
                        f"prompt_schedule key {chunk!r} must be a chunk index in [1, {num_chunks - 1}] "
                        "(chunk 0 uses `prompt`)."
                    )
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"prompt_schedule[{chunk}]={text!r} must be a non-empty string.")

    @property
    def default_guidance_scale(self) -> float:
        """The guidance a call without ``guidance_scale`` uses (the config's; 1.0 for folders saved before it)."""
        return float(getattr(self.config, "guidance_scale", 1.0))

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1

    # ------------------------------------------------------------------ the sampler
    @property
    def denoiser(self) -> Denoiser:
        """What the sampler calls: the accelerated network of :meth:`enable_realtime`, else the eager transformer."""
        return self._realtime_denoiser or TransformerDenoiser(self.transformer)

    def sampler(self, device) -> ChunkSampler:
        """The chunk sampler of this pipeline: its denoiser, the few-step list and the scheduler's sigmas."""
        timesteps = self.config.denoising_timesteps
        return ChunkSampler(self.denoiser, timesteps, scheduler_sigmas(self.scheduler, timesteps, device))

    # ------------------------------------------------------------------ real time
    def enable_realtime(
        self,
        compile: bool = True,
        overlap_decode: bool = True,
        attention_backend: str | None = None,
        cudnn_benchmark: bool = True,
        self_attention_kernel: str | None = None,
        vae_conv: str = "conv3d",
        vae_fuse: bool = True,
        cuda_graphs: bool = True,
        devices: tuple[str | torch.device, str | torch.device] | None = None,
        fp8: bool = False,
        preview_decoder=None,
        transformer_split: float | None = None,
        unsplit_forwards: int | None = None,
        **compile_kwargs,
    ) -> "CausalWanPipeline":
        """Turn on the fast streaming path (outputs equal the eager path up to kernel numerics; see BENCHMARKS.md).

        Everything wraps the sampler from outside: the transformer blocks are compiled (on CUDA each FFN's GELU runs
        in its up-projection's GEMM epilogue, ``CausalWanTransformer3DModel.set_gelu_epilogue``), its streaming calls
        replayed as CUDA graphs (a :class:`~raven_video.sampling.sampler.Denoiser` of its own), and the VAE decode runs
        a faster decoder on a second CUDA stream. The first two streams of a shape are slower: compilation, then
        CUDA-graph capture.

        Args:
            compile: ``torch.compile`` the static-shape halves of every transformer block (regional compile, one
                graph shared by all blocks; the KV-cache gather and attention stay eager, so no recompilation per
                chunk position), and the fused VAE row kernels of ``vae_fuse``. ``compile_kwargs`` go to the
                transformer's ``torch.compile`` (e.g. ``mode=...``, ``backend=...``).
            overlap_decode: decode each chunk on a second CUDA stream while the next chunk's transformer work runs
                (the first chunk is still yielded as soon as it is decoded).
            attention_backend: a diffusers attention backend for the streaming attention (e.g. ``"_native_cudnn"``,
                ``"flash"``, ``"_flash_3_hub"``), see ``diffusers.models.attention_dispatch``.
            cudnn_benchmark: set ``torch.backends.cudnn.benchmark = True`` (process-wide) so the VAE's 3-D
                convolutions use the fastest algorithm.
            self_attention_kernel: PyTorch SDPA kernel for the streaming self-attention only (``"cudnn"``,
                ``"flash"``, ``"fa3"``, ...; see ``CausalWanTransformer3DModel.set_self_attention_kernel``).
            vae_conv: causal 3-D convolutions of the streaming VAE decoder (``"conv3d"``, ``"taps2d"``,
                ``"stack2d"`` or ``"diffusers"``), see :class:`~raven_video.pipelines.vae_fast.FastWanDecoder`.
            vae_fuse: fused pointwise work in the VAE decoder (cached frames + RMS norm + SiLU + bias in one kernel;
                H100 decode 2.10 -> 0.91 s with ``vae_conv="conv3d"``).
            cuda_graphs: capture each streaming transformer call (per chunk position, denoising / cache pass) in a
                CUDA graph on its second occurrence and replay it afterwards; the KV cache is then kept between
                streams of the same shape. See :mod:`raven_video.pipelines.cuda_graphs`. On CPU it runs eagerly.
            devices: ``(transformer_device, vae_device)``, e.g. ``("cuda:0", "cuda:1")``: the VAE moves to the second
                GPU and decodes each chunk there, overlapped with the next chunk's transformer work (the frames stay
                on that device). Call it after ``pipe.to(...)``. Falls back to one device, with one log line, where
                the second device does not exist.
            fp8: FP8 linear layers (row-wise scaled ``torch._scaled_mm``) for the blocks' self-attention projections
                and FFNs, attention in bf16 (:mod:`raven_video.models.fp8`; ~3 % relative error per layer). Inference
                only; one log line and no change where FP8 GEMMs cannot run (GPUs before sm89). On an H200 it is no
                longer faster than bf16 (2.51 vs 2.49 s, BENCHMARKS.md): FP8 linears give up the GELU epilogue, and
                each call quantises its input.
            preview_decoder: a :class:`~raven_video.pipelines.preview_decoder.TAEHVDecoder`, a ``.safetensors``
                file of TAEHV weights in the official layout (e.g. ``taew2_1``), or a ``TAEHVDecoder`` folder (e.g.
                one ``train_preview_decoder.py`` distilled from this pipeline's VAE): each chunk is decoded by that
                tiny decoder instead of the Wan VAE (a fast, lower-quality preview), on the VAE's device and dtype.
            transformer_split: with ``devices``, run the transformer token-parallel over both devices too: the first
                computes this share of each chunk's tokens (``0.5`` was fastest on two H200s, BENCHMARKS.md), the
                second (which also decodes) the rest, with one K/V exchange per block
                (:mod:`raven_video.pipelines.token_parallel`; a replica of the transformer on the second device, so
                load weights and adapters first). Outputs equal the one-device path up to GEMM rounding. Falls back
                to the plain two-device split, with one log line, where the second device does not exist.
            unsplit_forwards: with ``transformer_split``, how many forwards per chunk run whole on the first device
                while the second decodes uncontested: 0 splits every forward, 1 each cache pass (its K/V are then
                copied to the second device), 2 (default, fastest on two H200s: 1.65-1.70 s against 1.83-1.86 s
                with 0) also the next chunk's first step (:mod:`raven_video.pipelines.token_parallel`).
        """
        if unsplit_forwards is not None and transformer_split is None:
            raise ValueError(f"unsplit_forwards={unsplit_forwards!r} needs transformer_split (it runs some of the "
                             "split transformer's forwards whole), e.g. transformer_split=0.5.")
        if transformer_split is not None:
            from .token_parallel import check_unsplit_forwards

            if devices is None:
                raise ValueError(f"transformer_split={transformer_split!r} needs devices=(first, second), e.g. "
                                 "devices=('cuda:0', 'cuda:1').")
            if not 0.0 < float(transformer_split) < 1.0:
                raise ValueError(f"transformer_split={transformer_split!r} must be in (0, 1): the first device's share "
                                 "of each chunk's tokens, e.g. 0.5.")
            unsplit_forwards = check_unsplit_forwards(2 if unsplit_forwards is None else unsplit_forwards)
            compile_kwargs.setdefault("dynamic", False)  # each device's share has its own static shape
        self._decode_device = None
        if devices is not None:
            self._place_decoder(devices, split=transformer_split is not None)
        if fp8:
            from ..models.fp8 import enable_fp8

            enable_fp8(self.transformer)  # before compilation and CUDA-graph capture
        self.transformer.set_gelu_epilogue(True)  # the FFN's GELU in its GEMM's epilogue (CUDA; not FP8 linears)
        if compile:
            self.transformer.compile_streaming(**compile_kwargs)
        if attention_backend is not None:
            self.transformer.set_attention_backend(attention_backend)
        if self_attention_kernel is not None:
            self.transformer.set_self_attention_kernel(self_attention_kernel)
        self._fast_decoder = self._preview_decoder = None
        if preview_decoder is not None:
            self._preview_decoder = self._load_preview(preview_decoder)
        elif self.vae is not None and (vae_fuse or vae_conv != "diffusers"):
            from .vae_fast import FastWanDecoder

            self._fast_decoder = FastWanDecoder(self.vae, conv_impl=vae_conv, fuse=vae_fuse, compile=compile)
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self._overlap_decode = overlap_decode
        self._realtime_denoiser = None
        if transformer_split is not None and self._split_transformer(devices):
            from .token_parallel import TokenParallelDenoiser

            split = float(transformer_split)
            self._realtime_denoiser = TokenParallelDenoiser(self.transformer, devices, shares=(split, 1.0 - split),
                                                            cuda_graphs=cuda_graphs, unsplit_forwards=unsplit_forwards)
        elif cuda_graphs:
            from .cuda_graphs import StreamingGraphs

            self._realtime_denoiser = StreamingGraphs(self.transformer)
        return self

    @staticmethod
    def _split_transformer(devices) -> bool:
        """Whether ``transformer_split`` has a second device: one that exists (else ``_place_decoder`` said so) and,
        on CUDA, is another GPU (a replica on the same GPU only costs memory; one log line)."""
        first, second = (torch.device(d) for d in devices)
        if not _device_exists(second):
            return False
        if second.type == "cuda" and first.type == "cuda" and (first.index or 0) == (second.index or 0):
            logger.warning("enable_realtime(transformer_split=...): devices=%s name one GPU twice; the transformer "
                           "stays whole", tuple(str(d) for d in devices))
            return False
        return True

    def _place_decoder(self, devices, split: bool = False) -> None:
        """``enable_realtime(devices=...)``: the VAE on the second device (validated), or one log line and no split
        (``split``: the line says the transformer stays whole too)."""
        if not isinstance(devices, (tuple, list)) or len(devices) != 2:
            raise ValueError(f"devices={devices!r}: give (transformer_device, vae_device), e.g. ('cuda:0', 'cuda:1').")
        dit, vae = (torch.device(d) for d in devices)
        if dit != self.transformer.device:
            raise ValueError(f"devices[0]={str(dit)!r} but the transformer is on {self.transformer.device}: call "
                             f"pipe.to({str(dit)!r}) first.")
        if not _device_exists(vae):
            logger.warning("enable_realtime(devices=%s): %s is not available here; decoding%s on %s",
                           tuple(str(d) for d in devices), vae, " and the whole transformer" if split else "", dit)
            return
        if vae != dit:
            self.vae.to(vae)
            self._decode_device = vae

    def _load_preview(self, preview):
        from .preview_decoder import TAEHVDecoder

        if isinstance(preview, (str, os.PathLike)):
            if not (str(preview).endswith(".safetensors") or os.path.isdir(preview)):
                raise ValueError(f"preview_decoder={str(preview)!r}: pass a .safetensors file, a TAEHVDecoder folder "
                                 "(save_pretrained), or a TAEHVDecoder you loaded yourself "
                                 "(TAEHVDecoder.from_file(path, allow_pickle=True) for a .pth).")
            preview = TAEHVDecoder.from_file(preview)
        if not isinstance(preview, TAEHVDecoder):
            raise TypeError(f"preview_decoder must be a TAEHVDecoder or a .safetensors path, not {type(preview).__name__}.")
        reference = self.vae if self.vae is not None else self.transformer
        # nn.Module.to: diffusers' ModelMixin.to(dtype=...) warns about float32-kept modules, which TAEHV has none of
        return torch.nn.Module.to(preview, device=self._decode_device or reference.device, dtype=reference.dtype).eval()

    @property
    def _transformer_device(self) -> torch.device:
        """Where the sampler runs: the execution device, or the transformer's own when the VAE is elsewhere."""
        return self.transformer.device if self._decode_device is not None else self._execution_device

    def _decode_stream(self, device):
        decode_device = torch.device(self._decode_device or device)
        if (self._overlap_decode or self._decode_device is not None) and decode_device.type == "cuda":
            if self._side_stream is None or self._side_stream.device != decode_device:
                self._side_stream = torch.cuda.Stream(device=decode_device)
            return self._side_stream
        return None

    # ------------------------------------------------------------------ the chunk loop
    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 81,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        max_sequence_length: int | None = None,
        prompt_schedule: Mapping[int, str] | None = None,
        recache_on_switch: bool = True,
        local_attn_size: int | None = None,
        sink_size: int | None = None,
    ) -> Iterator[StreamChunk]:
        r"""Generate chunk by chunk, yielding decoded frames as soon as each chunk is done.

        Args:
            prompt, negative_prompt, num_frames, height, width, generator, output_type: as in ``__call__``.
            guidance_scale (`float`, *optional*): classifier-free guidance of the student (default: the pipeline
                config's ``guidance_scale``; 1 = unguided, the
                released RAVEN setting; >1 runs a negative branch with its own cache entries).
            latents (`torch.Tensor`, *optional*): the full-length initial noise ``[B, 16, F_lat, H/8, W/8]``.
            prompt_schedule (`Mapping[int, str]`, *optional*): ``{chunk_index: new_prompt}`` switches the prompt from
                that chunk on (new text K/V; with ``recache_on_switch`` the cached history is re-encoded with the new
                prompt, as LongLive does). Read when the stream reaches each chunk, so entries may be added while it
                runs (an interactive prompt switch). Needs a batch of one prompt.
            local_attn_size, sink_size (`int`, *optional*): LongLive-style window/sink (latent frames) overriding the
                transformer config, for streams longer than the training length (RoPE limit: 1024 latent frames).

        Yields:
            :class:`StreamChunk` per chunk.
        """
        height = self.config.height if height is None else height
        width = self.config.width if width is None else width
        if max_sequence_length is None:
            max_sequence_length = self.config.max_sequence_length
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        self.check_inputs(prompt, negative_prompt, num_frames, height, width, prompt_embeds, guidance_scale,
                          local_attn_size, sink_size, prompt_schedule, num_videos_per_prompt, max_sequence_length)
        if prompt_schedule is not None and (prompt is None or (not isinstance(prompt, str) and len(prompt) != 1)):
            raise ValueError("prompt_schedule needs a single `prompt` string (prompt switching is per stream).")
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"output_type={output_type!r}; use 'np', 'pt', 'pil' or 'latent'.")
        device = self._transformer_device

        def encode(prompts):
            return self._encode(prompts, negative_prompt, guidance_scale, num_videos_per_prompt, max_sequence_length,
                                device)

        if prompt_embeds is None:
            text = encode(prompt)
        else:
            text = prompt_embeds if guidance_scale <= 1.0 else torch.cat([negative_prompt_embeds, prompt_embeds])
            text = text.to(device=device, dtype=self.transformer.dtype)
        batch = text.shape[0] // (2 if guidance_scale > 1.0 else 1)

        config = self.transformer.config
        latent_frames = self.latent_frames(num_frames)
        lh, lw = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        shape = (batch, config.in_channels, latent_frames, lh, lw)
        if latents is None:
            latents = initial_noise(shape, generator, device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}.")
        latents = latents.to(device=device, dtype=torch.float32)

        sampler = self.sampler(device)
        window = config.local_attn_size if local_attn_size is None else local_attn_size
        cache = sampler.denoiser.kv_cache(text.shape[0], lh, lw, max_frames=latent_frames if window == -1 else None,
                                          local_attn_size=local_attn_size, sink_size=sink_size, device=device)
        decoder = None
        if output_type != "latent":
            decoder = _ChunkDecoder(self.vae, self.video_processor, output_type, self._fast_decoder,
                                    self._decode_stream(device), self._preview_decoder)
        sizes = self.transformer.chunk_sizes(latent_frames)
        switches = _EncodedSchedule(prompt_schedule, encode) if prompt_schedule is not None else None
        current_prompt = [prompt] * batch if isinstance(prompt, str) else (list(prompt) if prompt else None)
        last_yield = time.perf_counter()
        pending = None  # a chunk whose decode runs on the side stream while the next chunk's DiT work is queued

        def finish(chunk):
            nonlocal last_yield
            if decoder is not None:
                chunk.frames = decoder.result(chunk.frames)
            now = time.perf_counter()
            chunk.seconds, last_yield = now - last_yield, now
            return chunk

        with self.progress_bar(total=len(sizes) * sampler.num_steps) as progress:
            for sampled in sampler.sample(latents, text, cache, sizes, generator, guidance_scale, switches,
                                          recache_on_switch):
                index, start, clean = sampled.index, sampled.start, sampled.latents
                progress.update(sampler.num_steps)
                if switches is not None and index in switches:
                    current_prompt = [prompt_schedule[index]]
                if pending is not None:
                    yield finish(pending)
                    pending = None
                pixel_start = 0 if index == 0 else (start - 1) * self.vae_scale_factor_temporal + 1
                chunk = StreamChunk(index, decoder.submit(clean) if decoder else None, clean, pixel_start,
                                    current_prompt)
                if decoder is not None and decoder.defers(index, device):
                    pending = chunk  # yielded after the next chunk's DiT work is queued
                else:
                    yield finish(chunk)
            if pending is not None:
                yield finish(pending)
        self.maybe_free_model_hooks()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 81,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        **stream_kwargs,
    ) -> WanPipelineOutput | tuple:
        r"""Generate a whole video (the concatenation of :meth:`stream`'s chunks).

        Returns:
            `WanPipelineOutput` with `frames`: ``np`` -> ``[B, F, H, W, 3]`` float in [0, 1]; ``pt`` -> ``[B, F, 3, H,
            W]``; ``pil`` -> list of lists of images; ``latent`` -> the latents ``[B, 16, F_lat, H/8, W/8]``.
        """
        chunks = list(
            self.stream(
                prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height, width=width,
                guidance_scale=guidance_scale, num_videos_per_prompt=num_videos_per_prompt, generator=generator,
                latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                output_type=output_type, max_sequence_length=max_sequence_length, **stream_kwargs,
            )
        )
        if output_type == "latent":
            video = torch.cat([c.latents for c in chunks], dim=2)
        elif output_type == "np":
            video = np.concatenate([c.frames for c in chunks], axis=1)
        elif output_type == "pt":
            video = torch.cat([c.frames for c in chunks], dim=1)
        else:
            video = [sum((c.frames[b] for c in chunks), []) for b in range(len(chunks[0].frames))]
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)

    # ------------------------------------------------------------------ save / load (Hub layout)
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` + the Hub layout (``trust_remote_code`` shims)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        hub.write_hub_layout(save_directory)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """``model_index.json`` as diffusers reads it, with our shim entries mapped onto the installed classes, so
        loading never imports the folder's shim files (:func:`~raven_video.pipelines.hub.installed_index`)."""
        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (hub.installed_index(loaded[0]), *loaded[1:])
        return hub.installed_index(loaded)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a ``CausalWanPipeline`` folder or Hub repo with the installed ``raven_video`` classes.

        No file of the folder is ever imported: the ``trust_remote_code`` shims it carries (for ``DiffusionPipeline``
        users) are read as "the installed class", and a folder naming any other custom code (a pipeline file, a
        component module) is refused with an error naming it, unless ``trust_remote_code=True`` is passed, which hands
        those modules to diffusers to import. Other keyword arguments as ``DiffusionPipeline.from_pretrained``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("trust_remote_code"):
            return super().from_pretrained(path, **kwargs)
        if os.path.isdir(path):
            index_path = os.path.join(path, "model_index.json")
            if not os.path.isfile(index_path):
                raise FileNotFoundError(f"{path!r} has no model_index.json: it is not a saved pipeline folder.")
            with open(index_path) as f:
                hub.refuse_foreign_code(json.load(f), f"folder {path!r}")
            return super().from_pretrained(path, **kwargs)
        folder = hub.download(path, **kwargs)
        pipe = super().from_pretrained(folder, **{k: v for k, v in kwargs.items() if k not in hub.DOWNLOAD_KWARGS})
        pipe.register_to_config(_name_or_path=path)
        return pipe

"""Builders of tiny, seeded, download-free components (CPU tests, the no-weights default of ``generate.py``).

A plain module of functions (no pytest fixtures) shipped in the package so tests, benchmarks, docs and the default
of ``generate.py`` (no ``--model``: a tiny RANDOM pipeline whose output is noise) share them:

    from raven_video.testing import tiny_pipeline, tiny_causal_transformer, tiny_vae, tiny_tokenizer

(`tiny_pass_through_vae` is a tiny VAE whose decoded brightness follows latent channel 0, for reward tests.)

Shape conventions kept equal to Wan2.1 so the pipeline code paths are the real ones:
- the VAE keeps `z_dim=16` (= the transformer's `in_channels`/`out_channels`, and the 16-entry `latents_mean/std`
  of the real Wan VAE are reused, so de-normalisation is exercised with real numbers), the temporal stride 4
  (`temperal_downsample=[False, True, True]`) and the spatial stride 8 (`dim_mult` of length 4); only the width
  (`base_dim=8`) and depth (`num_res_blocks=1`) shrink. Pixel frames = 4 * (latent frames - 1) + 1.
- the text encoder's `d_model` (`TINY_TEXT_DIM`) is the `text_dim` a tiny transformer must use.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from diffusers import AutoencoderKLWan, FlowMatchLCMScheduler, WanTransformer3DModel


TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 16

_TOKENIZER_CORPUS = [
    "a cat walks on the grass in the sun",
    "a dog runs along the beach at sunset",
    "a red car drives down a city street at night",
    "waves crash on the rocks under a cloudy sky",
    "a person rides a bicycle through the park",
    "snow falls slowly over a quiet mountain village",
    "a bird flies above the river and the trees",
    "timelapse of clouds moving over a green field",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    r"""
    A word-level `PreTrainedTokenizerFast` trained locally on a few sentences (no download).

    Special tokens follow T5: `<pad>`=0, `</s>`=1 (appended to every sequence), `<unk>`=2. Deterministic (the
    vocabulary is the sorted-by-frequency word list of `_TOKENIZER_CORPUS`). `len(tokenizer)` is the vocab size the
    text encoder must use.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"], min_frequency=1)
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def tiny_text_encoder(
    seed: int = 0, vocab_size: int | None = None, dtype: torch.dtype = torch.float32
) -> UMT5EncoderModel:
    r"""
    A 2-layer `UMT5EncoderModel` with `d_model=TINY_TEXT_DIM` (32), 4 heads of 8; output `[B, L, 32]`.

    Args:
        seed: torch seed for the random weights.
        vocab_size: defaults to `len(tiny_tokenizer())`.
    """
    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32, base_dim: int = 8) -> AutoencoderKLWan:
    r"""
    An `AutoencoderKLWan` with `base_dim=8`, one residual block per level, `z_dim=16` and the Wan2.1 strides
    (time 4, space 8). Latents `[B, 16, f, h, w]` decode to `[B, 3, 4(f-1)+1, 8h, 8w]`.
    """
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=TINY_LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )
    if dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.eval()


def tiny_pass_through_vae(seed: int = 0) -> AutoencoderKLWan:
    r"""
    The :func:`tiny_vae` architecture with a hand-set decoder whose pixel brightness follows the first latent channel.

    A random tiny VAE is nearly blind to its latents (its RMS norms and random convolutions average shifts away:
    the mean brightness of a decoded video moves by ~0.003 when a latent channel moves by 3), so a reward on decoded
    videos cannot see what a tiny transformer learns. This decoder makes every pixel of every RGB channel a
    monotonic function of latent channel 0 at the same place and time (after the pipeline's de-normalisation):
    `pixel = clamp(3 * silu(u / sqrt(u**2 + 36)) - 0.3, -1, 1)`, `u = c + 4`, `c = latent[0] * std[0] + mean[0]`
    (the +4 centres the tiny random transformer's channel-0 output, about -4, so brightness can move both ways),
    through the real `AutoencoderKLWan` code (residual branches and the attention projection are zeroed, the
    shortcuts and the up-samplers' spatial and temporal convolutions are channel-identities, `conv_in` adds a
    constant channel of 6 so the final RMS norm keeps the first channel's size). Used by the end-to-end RL test, where a brightness reward must be
    movable. The encoder keeps its random weights.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock

    vae = tiny_vae(seed=seed)

    def channel_identity(weight: torch.Tensor, out_offset: int = 0) -> None:
        # a centre (spatial) / last (causal time) tap mapping input channel i to output channel out_offset + i
        n = min(weight.shape[0] - out_offset, weight.shape[1])
        tap = tuple(k // 2 for k in weight.shape[2:])
        if weight.ndim == 5:  # causal 3-D kernel: the current frame is the last temporal tap
            tap = (weight.shape[2] - 1, *tap[1:])
        for i in range(n):
            weight[(out_offset + i, i, *tap)] = 1.0

    with torch.no_grad():
        decoder = vae.decoder
        for module in decoder.modules():
            if isinstance(module, WanResidualBlock):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if not isinstance(module.conv_shortcut, torch.nn.Identity):
                    module.conv_shortcut.weight.zero_()
                    module.conv_shortcut.bias.zero_()
                    channel_identity(module.conv_shortcut.weight)
            elif isinstance(module, WanAttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
            elif isinstance(module, WanResample) and module.mode.startswith("upsample"):
                conv = module.resample[1]
                conv.weight.zero_()
                conv.bias.zero_()
                channel_identity(conv.weight)
                if module.mode == "upsample3d":  # two output frames per input frame: channels [0, c) and [c, 2c)
                    module.time_conv.weight.zero_()
                    module.time_conv.bias.zero_()
                    channel_identity(module.time_conv.weight)
                    channel_identity(module.time_conv.weight, out_offset=module.dim)
        for conv in (vae.post_quant_conv,):
            conv.weight.zero_()
            conv.bias.zero_()
            channel_identity(conv.weight)
        decoder.conv_in.weight.zero_()
        decoder.conv_in.bias.zero_()
        decoder.conv_in.weight[0, 0, -1, 1, 1] = 1.0
        decoder.conv_in.bias[0] = 4.0
        decoder.conv_in.bias[1] = 6.0
        decoder.norm_out.gamma.fill_(1.0 / decoder.norm_out.scale)  # plain x / ||x|| over channels
        decoder.conv_out.weight.zero_()
        decoder.conv_out.weight[:, 0, -1, 1, 1] = 3.0
        decoder.conv_out.bias.fill_(-0.3)
    return vae


def tiny_scheduler() -> FlowMatchLCMScheduler:
    r"""`FlowMatchLCMScheduler(shift=5.0)`: the few-step consistency sampler (docs/method.md §1; Eq. 6)."""
    return FlowMatchLCMScheduler(shift=5.0)


def tiny_wan_transformer_config(**overrides) -> dict:
    r"""Config of a 2-layer, 2-head (head dim 16) `WanTransformer3DModel` matching the tiny text encoder and VAE."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    config.update(overrides)
    return config


def tiny_wan_transformer(
    seed: int = 0, dtype: torch.dtype = torch.float32, model_cls: type = WanTransformer3DModel, **overrides
):
    r"""
    A tiny Wan transformer (default: plain diffusers `WanTransformer3DModel`) whose every parameter is random
    (including the zero / constant initialised ones), so weight-mapping mistakes cannot hide behind equal values.
    """
    torch.manual_seed(seed)
    model = model_cls(**tiny_wan_transformer_config(**overrides))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (1.0 if param.ndim == 1 else 0.0))
    from .models.transformer_causal_wan import cast_weights

    return cast_weights(model, dtype).eval()


def tiny_causal_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    r"""A tiny random :class:`~raven_video.CausalWanTransformer3DModel` (2 layers, 2 heads, chunks of 3 latent frames)."""
    from .models.transformer_causal_wan import CausalWanTransformer3DModel

    overrides.setdefault("num_frames_per_block", 3)
    return tiny_wan_transformer(seed=seed, dtype=dtype, model_cls=CausalWanTransformer3DModel, **overrides)


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, **transformer_overrides):
    r"""A complete tiny :class:`~raven_video.CausalWanPipeline` with random weights: real code paths, noise output."""
    from .pipelines.pipeline_causal_wan import CausalWanPipeline

    tokenizer = tiny_tokenizer()
    return CausalWanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(seed=seed, vocab_size=len(tokenizer), dtype=dtype),
        vae=tiny_vae(seed=seed),
        scheduler=tiny_scheduler(),
        transformer=tiny_causal_transformer(seed=seed, dtype=dtype, **transformer_overrides),
        height=64,  # native size: a default call takes seconds on a CPU
        width=96,
    )

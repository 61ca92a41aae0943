"""The world's small model stack: a word-level tokenizer over the caption vocabulary, a frozen random UMT5 text
encoder with a locality prior, the transformer's size, and the assembly of a ``CausalWanPipeline`` folder from
trained components.

Why a *frozen random* text encoder: the captions use 39 words in a closed grammar; a 2-layer UMT5 maps every caption
to a distinct sequence of token embeddings, and the transformer's trained text projection and cross-attention learn to
read them. Training the encoder jointly would add a third trained model to every stage.

Why a *locality prior* on its relative position biases (:data:`BINDING_HEADS`): Wan's cross-attention has no position
on the text side, so the transformer sees the caption as a set of token vectors. With UMT5's random init the relative
biases are tiny (std 0.12), attention is nearly uniform, and each output token is its own word plus the caption's
mean: swapping the colours of two objects changes the shape token's vector by 2-4 %, so *which* object is the circle
and *which* way it moves is almost invisible to the transformer (teachers trained on it learnt colour and background
early and shape and direction barely, ``docs/world.md``). Biases that make each head look at a fixed offset (the
word before, two and four after, itself) write each object's colour and motion into its shape token's vector (38-60 %
change) and leave the other objects' tokens alone (< 2 %), ``tests/test_world_stack.py``.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchLCMScheduler
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from ..sampling.flow import DEFAULT_SHIFT
from .captions import VOCABULARY
from .scene import FPS

__all__ = ["TEXT_DIM", "MAX_SEQUENCE_LENGTH", "BINDING_HEADS", "world_tokenizer", "world_text_encoder", "WORLD_TRANSFORMER",
           "world_pipeline"]

TEXT_DIM = 64
#: Text tokens of the world pipeline: the longest caption (3 objects with bounce clauses) has 54 with ``</s>``.
MAX_SEQUENCE_LENGTH = 64
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
#: The text encoder's locality prior: head ``h`` of every layer attends around relative offset ``offsets[h]`` with a
#: bias of ``-slope * |d - offset|`` (``d`` = key position - query position). "a red circle moves right quickly":
#: the shape token sees its colour (-1), and its motion and speed words (+2, +4).
BINDING_HEADS = dict(offsets=(-1, 2, 4, 0), slope=1.0)

#: The world transformer: 6 layers of width 256 (4 heads of 64), chunks of 3 latent frames, about 6.3M parameters.
WORLD_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=1024,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
    num_frames_per_block=3,
)


def world_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`~raven_video.world.captions.VOCABULARY` (T5's special tokens: ``<pad>`` 0,
    ``</s>`` 1 appended to every sequence, ``<unk>`` 2), built locally and deterministically."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation (the comma is a word)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right")


def world_text_encoder(seed: int = 0, binding: dict | None = BINDING_HEADS) -> UMT5EncoderModel:
    """A frozen random 2-layer ``UMT5EncoderModel`` of width :data:`TEXT_DIM` over the world vocabulary, its
    relative position biases set to the locality prior ``binding`` (:data:`BINDING_HEADS`; ``None``: UMT5's random
    init, the encoder of the first world runs)."""
    config = UMT5Config(vocab_size=len(SPECIAL_TOKENS) + len(VOCABULARY), d_model=TEXT_DIM, d_kv=16, d_ff=128,
                        num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=16,
                        relative_attention_max_distance=64, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng():  # a fixed init without touching the caller's RNG state
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(config).eval().requires_grad_(False)
    if binding is not None:
        offsets, slope = binding["offsets"], float(binding["slope"])
        if len(offsets) != config.num_heads:
            raise ValueError(f"binding offsets {offsets} must give one offset per head ({config.num_heads}).")
        relative = torch.arange(MAX_SEQUENCE_LENGTH)[None, :] - torch.arange(MAX_SEQUENCE_LENGTH)[:, None]
        for block in encoder.encoder.block:
            attention = block.layer[0].SelfAttention
            buckets = attention._relative_position_bucket(relative)
            table = attention.relative_attention_bias.weight  # [buckets, heads]
            for bucket in range(table.shape[0]):
                # a bucket's bias acts on every offset it holds: set it from their mean (exact below 4 tokens)
                members = relative[buckets == bucket].double()
                centre = float(members.mean()) if members.numel() else float(config.relative_attention_max_distance)
                table[bucket] = torch.tensor([-slope * abs(centre - offset) for offset in offsets])
    return encoder


def world_pipeline(vae, transformer, text_encoder=None, tokenizer=None, guidance_scale: float = 1.0):
    """A ``CausalWanPipeline`` of the world's components at its native size (64x64, 16 fps, 64 text tokens), sampled
    with ``guidance_scale`` when a call gives none."""
    from ..pipelines.pipeline_causal_wan import CausalWanPipeline

    return CausalWanPipeline(
        tokenizer=tokenizer or world_tokenizer(), text_encoder=text_encoder or world_text_encoder(), vae=vae,
        scheduler=FlowMatchLCMScheduler(shift=DEFAULT_SHIFT), transformer=transformer, fps=FPS, height=64, width=64,
        max_sequence_length=MAX_SEQUENCE_LENGTH, guidance_scale=guidance_scale,
    )

"""The world's small model stack: a word-level tokenizer over the caption vocabulary, a frozen random UMT5 text
encoder, the transformer's size, and the assembly of a ``CausalWanPipeline`` folder from trained components.

Why a *frozen random* text encoder: the captions use 39 words in a closed grammar. A randomly initialised 2-layer
UMT5 (relative position buckets, residual connections) maps every caption to a distinct sequence of token
embeddings that still carries each word and its position; the transformer's trained text projection and
cross-attention learn to read them. Training the encoder jointly would add a third trained model to every stage for
no information the frozen one lacks (``tests/test_world_stack.py`` checks that a linear probe on the frozen embeddings
recovers every object's colour, shape and motion).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchLCMScheduler
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from ..sampling.flow import DEFAULT_SHIFT
from .captions import VOCABULARY
from .scene import FPS

__all__ = ["TEXT_DIM", "MAX_SEQUENCE_LENGTH", "world_tokenizer", "world_text_encoder", "WORLD_TRANSFORMER", "world_pipeline"]

TEXT_DIM = 64
#: Text tokens of the world pipeline: the longest caption (3 objects with bounce clauses) has 54 with ``</s>``.
MAX_SEQUENCE_LENGTH = 64
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

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


def world_text_encoder(seed: int = 0) -> UMT5EncoderModel:
    """A frozen random 2-layer ``UMT5EncoderModel`` of width :data:`TEXT_DIM` over the world vocabulary."""
    config = UMT5Config(vocab_size=len(SPECIAL_TOKENS) + len(VOCABULARY), d_model=TEXT_DIM, d_kv=16, d_ff=128,
                        num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=16,
                        relative_attention_max_distance=64, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng():  # a fixed init without touching the caller's RNG state
        torch.manual_seed(seed)
        return UMT5EncoderModel(config).eval().requires_grad_(False)


def world_pipeline(vae, transformer, text_encoder=None, tokenizer=None):
    """A ``CausalWanPipeline`` of the world's components at its native size (64x64, 16 fps, 64 text tokens)."""
    from ..pipelines.pipeline_causal_wan import CausalWanPipeline

    return CausalWanPipeline(
        tokenizer=tokenizer or world_tokenizer(), text_encoder=text_encoder or world_text_encoder(), vae=vae,
        scheduler=FlowMatchLCMScheduler(shift=DEFAULT_SHIFT), transformer=transformer, fps=FPS, height=64, width=64,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )

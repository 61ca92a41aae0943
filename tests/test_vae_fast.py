"""The fast Wan VAE decoder paths (``raven_video.pipelines.vae_fast``) give diffusers' outputs: every causal-conv
implementation and the fused pointwise work, streamed chunk by chunk and one-shot, eager and compiled."""

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from raven_video.pipelines.vae_fast import CAUSAL_CONV_IMPLS, fuse_decoder_pointwise, set_causal_conv_impl
from raven_video.pipelines.vae_streaming import StreamingWanDecoder
from raven_video.testing import tiny_pipeline, tiny_vae

LATENTS = torch.randn(1, 16, 7, 4, 6, generator=torch.Generator().manual_seed(0))


def _stream(vae, latents=LATENTS):
    """A stream that starts with one latent frame (the first-chunk path), then chunks of 3."""
    decoder = StreamingWanDecoder(vae)
    return torch.cat([decoder.decode_chunk(latents[:, :, s:e]) for s, e in ((0, 1), (1, 4), (4, 7))], dim=2)


@pytest.fixture(scope="module")
def reference():
    vae = tiny_vae(seed=0, base_dim=16)
    return _stream(vae), vae.decode(LATENTS).sample


@pytest.mark.parametrize("impl", [i for i in CAUSAL_CONV_IMPLS if i != "diffusers"])
def test_causal_conv_impls_match_diffusers(reference, impl):
    vae = tiny_vae(seed=0, base_dim=16)
    switched = set_causal_conv_impl(vae, impl)
    assert switched == sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules()) + 1  # + post_quant_conv
    torch.testing.assert_close(_stream(vae), reference[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(vae.decode(LATENTS).sample, reference[1], rtol=0, atol=2e-5)
    set_causal_conv_impl(vae, "diffusers")  # back to diffusers' own forward: bit for bit
    assert torch.equal(_stream(vae), reference[0])
    assert not any("forward" in m.__dict__ for m in vae.modules())


@pytest.mark.parametrize("compile", [False, True])
def test_fused_pointwise_matches_diffusers(reference, compile):
    vae = tiny_vae(seed=0, base_dim=16)
    set_causal_conv_impl(vae, "conv3d")
    fuse_decoder_pointwise(vae, compile=compile)
    assert isinstance(vae.decoder.nonlinearity, torch.nn.Identity)  # the head's SiLU moved into the fused norm
    torch.testing.assert_close(_stream(vae), reference[0], rtol=0, atol=2e-5)
    if compile:  # a second stream reuses every compiled row kernel (one set per channel count, not per frame)
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        _stream(vae)
        assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(vae.decode(LATENTS).sample, reference[1], rtol=0, atol=2e-5)
    # batch 2 takes diffusers' residual forward (the fused one is written for the streaming batch of 1)
    both = torch.cat([LATENTS, LATENTS.flip(2)])
    expected = tiny_vae(seed=0, base_dim=16).decode(both).sample
    torch.testing.assert_close(vae.decode(both).sample, expected, rtol=0, atol=2e-5)
    fuse_decoder_pointwise(vae, enable=False)
    set_causal_conv_impl(vae, "diffusers")
    assert isinstance(vae.decoder.nonlinearity, torch.nn.SiLU)
    assert torch.equal(_stream(vae), reference[0])


def test_fused_pointwise_caches_like_diffusers():
    """The fused residual blocks keep the same causal cache: a stream decoded in chunks equals the same latents
    decoded in other chunkings (first chunk of 1 or 3 latent frames)."""
    vae = tiny_vae(seed=0, base_dim=16)
    fuse_decoder_pointwise(vae, compile=False)
    decoder = StreamingWanDecoder(vae)
    chunked = torch.cat([decoder.decode_chunk(LATENTS[:, :, s:s + 3]) for s in range(0, 7, 3)], dim=2)
    torch.testing.assert_close(chunked, _stream(vae), rtol=0, atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'tile2d'.*choose one of"):
        set_causal_conv_impl(tiny_vae(), "tile2d")
    with pytest.raises(TypeError, match="AutoencoderKLWan, got Linear"):
        set_causal_conv_impl(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="AutoencoderKLWan, got Linear"):
        fuse_decoder_pointwise(torch.nn.Linear(2, 2))


def test_enable_realtime_vae_fuse_keeps_pipeline_outputs():
    size = dict(num_frames=33, height=32, width=48)
    eager = tiny_pipeline(seed=0)
    fast = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, vae_fuse=True)
    assert fast.vae._raven_causal_conv_impl == "conv3d"
    outs = []
    for pipe in (eager, fast):
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **size).frames)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)

"""The fast Wan VAE decoder (``raven_video.pipelines.vae_fast.FastWanDecoder``) gives diffusers' outputs: every
causal-conv implementation and the fused pointwise work, streamed chunk by chunk and one-shot, eager and compiled,
without touching the VAE."""

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from raven_video.pipelines.vae_fast import CAUSAL_CONV_IMPLS, FastWanDecoder
from raven_video.pipelines.vae_streaming import StreamingWanDecoder
from raven_video.testing import tiny_pipeline, tiny_vae

LATENTS = torch.randn(1, 16, 7, 4, 6, generator=torch.Generator().manual_seed(0))


def _stream(vae, decoder=None, latents=LATENTS):
    """A stream that starts with one latent frame (the first-chunk path), then chunks of 3."""
    streaming = StreamingWanDecoder(vae, decoder=decoder)
    return torch.cat([streaming.decode_chunk(latents[:, :, s:e]) for s, e in ((0, 1), (1, 4), (4, 7))], dim=2)


def _one_shot(vae, decoder, latents=LATENTS):
    return StreamingWanDecoder(vae, decoder=decoder).decode_chunk(latents)


def _untouched(vae):
    return not any("forward" in m.__dict__ for m in vae.modules()) and isinstance(vae.decoder.nonlinearity,
                                                                                 torch.nn.SiLU)


@pytest.fixture(scope="module")
def reference():
    vae = tiny_vae(seed=0, base_dim=16)
    return _stream(vae), StreamingWanDecoder(vae).decode_all(LATENTS)


@pytest.mark.parametrize("impl", [i for i in CAUSAL_CONV_IMPLS if i != "diffusers"])
def test_causal_conv_impls_match_diffusers(reference, impl):
    vae = tiny_vae(seed=0, base_dim=16)
    fast = FastWanDecoder(vae, conv_impl=impl, fuse=False)
    assert fast.num_fast_convs == sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    torch.testing.assert_close(_stream(vae, fast), reference[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(_one_shot(vae, fast), reference[1], rtol=0, atol=2e-5)
    assert _untouched(vae) and torch.equal(_stream(vae), reference[0])  # the VAE itself is diffusers' still
    # "diffusers" runs the modules' own forwards in diffusers' order: bit for bit
    assert torch.equal(_stream(vae, FastWanDecoder(vae, conv_impl="diffusers", fuse=False)), reference[0])


@pytest.mark.parametrize("compile", [False, True])
def test_fused_pointwise_matches_diffusers(reference, compile):
    vae = tiny_vae(seed=0, base_dim=16)
    fast = FastWanDecoder(vae, conv_impl="conv3d", fuse=True, compile=compile)
    torch.testing.assert_close(_stream(vae, fast), reference[0], rtol=0, atol=2e-5)
    if compile:  # a second stream reuses every compiled row kernel (one set per channel count, not per frame)
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        _stream(vae, fast)
        assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(_one_shot(vae, fast), reference[1], rtol=0, atol=2e-5)
    # batch 2 takes diffusers' order of operations (the fused one is written for the streaming batch of 1)
    both = torch.cat([LATENTS, LATENTS.flip(2)])
    expected = StreamingWanDecoder(tiny_vae(seed=0, base_dim=16)).decode_all(both)
    torch.testing.assert_close(_one_shot(vae, fast, both), expected, rtol=0, atol=2e-5)
    assert _untouched(vae) and torch.equal(_stream(vae), reference[0])


def test_fused_pointwise_caches_like_diffusers():
    """The fused residual blocks keep the same causal cache: a stream decoded in chunks equals the same latents
    decoded in other chunkings (first chunk of 1 or 3 latent frames)."""
    vae = tiny_vae(seed=0, base_dim=16)
    fast = FastWanDecoder(vae, compile=False)
    streaming = StreamingWanDecoder(vae, decoder=fast)
    chunked = torch.cat([streaming.decode_chunk(LATENTS[:, :, s:s + 3]) for s in range(0, 7, 3)], dim=2)
    torch.testing.assert_close(chunked, _stream(vae, fast), rtol=0, atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'tile2d'.*choose one of"):
        FastWanDecoder(tiny_vae(), "tile2d")
    with pytest.raises(TypeError, match="AutoencoderKLWan, got Linear"):
        FastWanDecoder(torch.nn.Linear(2, 2))


def test_enable_realtime_vae_fuse_keeps_pipeline_outputs():
    size = dict(num_frames=33, height=32, width=48)
    eager = tiny_pipeline(seed=0)
    fast = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, vae_fuse=True)
    assert isinstance(fast._fast_decoder, FastWanDecoder) and fast._fast_decoder.conv_impl == "conv3d"
    outs = []
    for pipe in (eager, fast):
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **size).frames)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    assert _untouched(fast.vae)


@pytest.mark.parametrize("compile", [False, True])
def test_frame_interleave_and_nearest_2x_upsampling_are_diffusers_bit_for_bit(compile):
    """The time-doubled frames' interleave and Wan's nearest-exact 2x upsampling as one copy (the fused path): the
    same values as diffusers' reshape + stack + ``nn.Upsample``, in channels-last memory, for channels-last and
    contiguous inputs, eager and compiled."""
    from raven_video.pipelines.vae_fast import _is_nearest_2x, _row_kernel

    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
    for doubled in (False, True):
        for t in (1, 3):  # several frame counts: the compiled kernel's shapes are dynamic
            x = torch.randn(1, 8, t, 4, 6, generator=gen).to(torch.bfloat16)
            b, c, _, h, w = x.shape
            expected = x
            if doubled:  # diffusers' WanResample.forward for upsample3d after its time convolution
                c //= 2
                expected = x.reshape(b, 2, c, t, h, w)
                expected = torch.stack((expected[:, 0], expected[:, 1]), 3).reshape(b, c, t * 2, h, w)
            expected = module(expected.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w))
            for inputs in (x, x.contiguous(memory_format=torch.channels_last_3d)):
                out = _row_kernel("_frames_up2x", compile, inputs.shape[1])(inputs, doubled)
                assert torch.equal(out, expected) and out.is_contiguous(memory_format=torch.channels_last)
    assert _is_nearest_2x(module) and _is_nearest_2x(torch.nn.Upsample(scale_factor=2.0, mode="nearest"))
    for other in (torch.nn.Upsample(scale_factor=2.0, mode="bilinear"), torch.nn.Upsample(scale_factor=3.0),
                  torch.nn.Upsample(size=(8, 8)), torch.nn.Identity()):
        assert not _is_nearest_2x(other)

"""Streaming VAE decode (`StreamingWanDecoder`) == one-shot `vae.decode`, bit-exact (fp32, CPU), on a tiny Wan VAE."""

import pytest
import torch

from raven_video.pipelines.vae_streaming import StreamingWanDecoder, denormalize_wan_latents
from raven_video.testing import tiny_vae


def _latents(batch=1, frames=7, height=4, width=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, height, width, generator=generator)


def _stream(decoder, latents, first, rest):
    sizes = [first]
    while sum(sizes) < latents.shape[2]:
        sizes.append(min(rest, latents.shape[2] - sum(sizes)))
    chunks = [decoder.decode_chunk(part) for part in latents.split(sizes, dim=2)]
    return chunks


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(seed=0)


@pytest.mark.parametrize("first_chunk", [1, 3])
def test_streaming_equals_one_shot(vae, first_chunk):
    latents = _latents(frames=first_chunk + 6)  # first chunk, then two chunks of 3
    decoder = StreamingWanDecoder(vae)
    reference = decoder.decode_all(latents)
    chunks = _stream(decoder, latents, first_chunk, 3)

    assert chunks[0].shape[2] == 4 * first_chunk - 3
    assert all(c.shape[2] == 12 for c in chunks[1:])
    streamed = torch.cat(chunks, dim=2)
    num_latent = latents.shape[2]
    assert streamed.shape == (1, 3, 4 * (num_latent - 1) + 1, 32, 48)
    assert reference.shape == streamed.shape
    torch.testing.assert_close(streamed, reference, rtol=0, atol=0)
    assert decoder.num_frames == streamed.shape[2] and decoder.num_latent_frames == num_latent


def test_reference_matches_pipeline_denormalisation(vae):
    latents = _latents(frames=2)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    pipeline_latents = latents / (1.0 / std) + mean  # WanPipeline.__call__'s formula, bit for bit
    torch.testing.assert_close(denormalize_wan_latents(latents, vae), pipeline_latents, rtol=0, atol=0)
    decoded = StreamingWanDecoder(vae).decode_all(latents)
    torch.testing.assert_close(decoded, vae.decode(pipeline_latents).sample, rtol=0, atol=0)


def test_reset_starts_a_new_stream_and_vae_decode_does_not_interfere(vae):
    decoder = StreamingWanDecoder(vae)
    first = _latents(frames=3, seed=1)
    second = _latents(frames=4, seed=2)
    decoder.decode_chunk(first)
    vae.decode(first)  # clears the VAE's own cache; the stream state lives in the decoder
    decoder.reset()
    assert not decoder.started
    streamed = torch.cat(_stream(decoder, second, 1, 3), dim=2)
    torch.testing.assert_close(streamed, decoder.decode_all(second), rtol=0, atol=0)


def test_batch_and_slicing(vae):
    latents = _latents(batch=2, frames=3, height=2, width=4, seed=3)
    decoder = StreamingWanDecoder(vae)
    reference = decoder.decode_all(latents)
    streamed = torch.cat(_stream(decoder, latents, 1, 3), dim=2)
    torch.testing.assert_close(streamed, reference, rtol=0, atol=0)

    vae.enable_slicing()
    try:
        decoder.reset()
        reference = decoder.decode_all(latents)
        streamed = torch.cat(_stream(decoder, latents, 2, 3), dim=2)
        # `vae.decode` feeds post_quant_conv a batch-slice *view* (storage offset != 0); CPU conv kernels round
        # differently on unaligned memory, so sliced decoding agrees to fp32 rounding rather than bit for bit
        torch.testing.assert_close(streamed, reference, rtol=0, atol=1e-5)
    finally:
        vae.disable_slicing()


def test_wrong_shapes_raise_clear_errors(vae):
    decoder = StreamingWanDecoder(vae)
    with pytest.raises(ValueError, match="5 dims"):
        decoder.decode_chunk(torch.randn(16, 3, 4, 6))
    with pytest.raises(ValueError, match="z_dim=16"):
        decoder.decode_chunk(torch.randn(1, 4, 3, 4, 6))
    with pytest.raises(ValueError, match="empty"):
        decoder.decode_chunk(torch.randn(1, 16, 0, 4, 6))
    decoder.decode_chunk(_latents(frames=1))
    with pytest.raises(ValueError, match="reset"):
        decoder.decode_chunk(_latents(frames=3, height=6))
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        StreamingWanDecoder(torch.nn.Conv3d(1, 1, 1))


def test_pass_through_vae_maps_latent_channel_0_to_brightness():
    """The RL test's decoder: every RGB pixel is the documented monotonic function of latent channel 0."""
    from raven_video.testing import tiny_pass_through_vae

    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        video = tiny_pass_through_vae().decode(z).sample
    u = z[:, 0] + 4
    expected = (3 * torch.nn.functional.silu(u / torch.sqrt(u**2 + 36)) - 0.3).clamp(-1, 1)
    # pixel frame 0 <- latent frame 0; frames 1..4 <- latent frame 1, ...; 8x nearest upsampling in space
    for frame, latent_frame in ((0, 0), (1, 1), (4, 1), (8, 2)):
        for channel in range(3):
            torch.testing.assert_close(video[0, channel, frame, ::8, ::8], expected[0, latent_frame])

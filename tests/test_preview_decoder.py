"""TAEHV preview decoder (`taew2_1` layout): loading, Wan frame-count convention, streaming == one-shot (CPU, fp32)."""

import pytest
import torch
from safetensors.torch import save_file

from raven_video.pipelines.preview_decoder import TAEHVDecoder, TAEHVStreamingDecoder
from raven_video.pipelines.vae_streaming import StreamingWanDecoder
from raven_video.testing import tiny_vae


def official_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """The `decoder.*` tensors of upstream's taew2_1 checkpoint (written out from its layer list, not from our module)."""
    shapes = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,)}
    for index, n in [(3, 256), (4, 256), (5, 256), (9, 128), (10, 128), (11, 128), (15, 64), (16, 64), (17, 64)]:
        for conv, n_in in [(0, 2 * n), (2, n), (4, n)]:
            shapes[f"decoder.{index}.conv.{conv}.weight"] = (n, n_in, 3, 3)
            shapes[f"decoder.{index}.conv.{conv}.bias"] = (n,)
    shapes.update({
        "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
        "decoder.8.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
        "decoder.14.weight": (64, 128, 3, 3),
        "decoder.19.conv.weight": (128, 64, 1, 1),  # TGrow stride 2
        "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3),
        "decoder.22.bias": (3,),
    })
    return shapes


ENCODER_SHAPES = {"encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,), "encoder.2.conv.weight": (64, 128, 1, 1),
                  "encoder.17.weight": (16, 64, 3, 3), "encoder.17.bias": (16,)}


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in {**ENCODER_SHAPES, **official_decoder_shapes()}.items():
        fan_in = shape[1] * shape[2] * shape[3] if len(shape) == 4 else 1
        state[key] = torch.randn(shape, generator=generator) * (1.0 / fan_in**0.5 if len(shape) == 4 else 0.1)
    return state


def _latents(frames: int, batch: int = 1, size: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, frames, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one thread is fastest, and stays fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decoder(one_thread) -> TAEHVDecoder:
    return TAEHVDecoder.from_state_dict(official_state_dict()).eval()


def test_loads_official_layout_and_ignores_encoder(decoder):
    state = official_state_dict()
    own = decoder.state_dict()
    assert sorted(own) == sorted(official_decoder_shapes()) and len(own) == 64
    assert all(torch.equal(own[k], state[k]) for k in own)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("decoder.22.bias"), "missing keys: decoder.22.bias"),
    (lambda s: s.update({"decoder.23.weight": torch.zeros(3)}), "unexpected keys: decoder.23.weight"),
    (lambda s: s.update({"decoder.7.conv.weight": torch.zeros(512, 256, 1, 1)}),
     "wrong shapes: decoder.7.conv.weight (512, 256, 1, 1) != (256, 256, 1, 1)"),
])
def test_bad_state_dict_is_refused_clearly(edit, message):
    state = official_state_dict()
    edit(state)
    with pytest.raises(ValueError, match=r"taew2_1") as err:
        TAEHVDecoder.from_state_dict(state)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("frames, size", [(1, 4), (4, 4), (21, 2)])
def test_shape_and_frame_count_follow_wan_vae(decoder, frames, size):
    latents = _latents(frames, size=size)
    video = decoder.decode(latents)
    assert video.shape == (1, 3, 1 + 4 * (frames - 1), 8 * size, 8 * size)
    assert video.dtype == torch.float32 and video.min() >= -1 and video.max() <= 1 and video.std() > 0.01
    if frames < 21:  # the Wan VAE's own count for the same latents (skipped for 21: slow)
        assert tiny_vae().decode(latents).sample.shape == video.shape


def test_causal_prefix(decoder):
    latents = _latents(5, batch=2)
    full = decoder.decode(latents)
    torch.testing.assert_close(decoder.decode(latents[:, :, :2]), full[:, :, :5], rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch, sizes", [(1, [3] * 7), (2, [1, 1, 2, 5]), (2, [1, 8])])
def test_streaming_equals_one_shot(decoder, batch, sizes):
    latents = _latents(sum(sizes), batch=batch, seed=2)
    reference = decoder.decode(latents)
    stream = TAEHVStreamingDecoder(decoder)
    chunks = [stream.decode_chunk(part) for part in latents.split(sizes, dim=2)]
    assert [c.shape[2] for c in chunks] == [4 * sizes[0] - 3] + [4 * s for s in sizes[1:]]
    torch.testing.assert_close(torch.cat(chunks, dim=2), reference, rtol=0, atol=1e-6)
    assert stream.num_frames == reference.shape[2] == 4 * sum(sizes) - 3 and stream.num_latent_frames == sum(sizes)
    with pytest.raises(ValueError, match="reset"):
        stream.decode_chunk(_latents(3, batch=batch + 1))
    stream.reset()
    assert not stream.started
    torch.testing.assert_close(stream.decode_chunk(latents[:, :, :2]), reference[:, :, :5], rtol=0, atol=1e-6)


def test_chunk_frame_counts_match_wan_streaming_decoder(decoder):
    latents = _latents(7)
    wan, tae = StreamingWanDecoder(tiny_vae()), TAEHVStreamingDecoder(decoder)
    for part in latents.split(3, dim=2):
        assert wan.decode_chunk(part).shape == tae.decode_chunk(part).shape
    assert wan.num_frames == tae.num_frames == 25


def test_decode_raw_normalises_first(decoder):
    latents = _latents(2)
    mean, std = torch.linspace(-0.5, 0.5, 16), torch.linspace(0.5, 2.0, 16)
    raw = latents * std.view(1, 16, 1, 1, 1) + mean.view(1, 16, 1, 1, 1)
    torch.testing.assert_close(decoder.decode_raw(raw, mean.tolist(), std), decoder.decode(latents))


def test_from_file_safetensors_and_pickle_consent(tmp_path, decoder):
    state = official_state_dict()
    latents = _latents(2)
    save_file(state, tmp_path / "taew2_1.safetensors")
    loaded = TAEHVDecoder.from_file(tmp_path / "taew2_1.safetensors")
    assert torch.equal(loaded.decode(latents), decoder.decode(latents))

    torch.save(state, tmp_path / "taew2_1.pth")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        TAEHVDecoder.from_file(tmp_path / "taew2_1.pth")
    loaded = TAEHVDecoder.from_file(tmp_path / "taew2_1.pth", allow_pickle=True)
    assert torch.equal(loaded.decode(latents), decoder.decode(latents))

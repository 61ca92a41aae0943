"""CausalWanPipeline end to end on tiny random components."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from raven_video import CausalWanPipeline, CausalWanTransformer3DModel
from raven_video.testing import tiny_pipeline

SIZE = dict(num_frames=33, height=32, width=48)  # 9 latent frames = 3 chunks of 3; 2x3 tokens per frame


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_call_shape_range_and_determinism(pipe):
    a = pipe("a cat walks on the grass", generator=_gen(), **SIZE).frames
    b = pipe("a cat walks on the grass", generator=_gen(), **SIZE).frames
    c = pipe("a cat walks on the grass", generator=_gen(1), **SIZE).frames
    assert a.shape == (1, 33, 32, 48, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_and_output_types(pipe):
    out = pipe(["a cat", "a dog runs"], generator=_gen(), output_type="pt", **SIZE).frames
    assert out.shape == (2, 33, 3, 32, 48)
    latents = pipe("a cat", generator=_gen(), output_type="latent", **SIZE).frames
    assert latents.shape == (1, 16, 9, 4, 6)


def test_stream_concatenation_equals_call(pipe):
    full = pipe("a dog runs along the beach", generator=_gen(3), **SIZE).frames
    chunks = list(pipe.stream("a dog runs along the beach", generator=_gen(3), **SIZE))
    assert [c.frames.shape[1] for c in chunks] == [9, 12, 12]
    assert [c.frame_start for c in chunks] == [0, 9, 21]
    assert np.array_equal(np.concatenate([c.frames for c in chunks], axis=1), full)


def test_streaming_decode_equals_one_shot_decode(pipe):
    latents = pipe("a bird flies", generator=_gen(), output_type="latent", **SIZE).frames
    video = pipe("a bird flies", generator=_gen(), output_type="pt", **SIZE).frames  # streamed decode
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    one_shot = vae.decode(latents / (1.0 / std) + mean).sample  # WanPipeline's exact de-normalisation
    expected = pipe.video_processor.postprocess_video(one_shot, output_type="pt")
    assert torch.equal(video, expected)  # bit-exact


def test_cfg_runs_and_differs(pipe):
    plain = pipe("a cat", generator=_gen(), **SIZE).frames
    guided = pipe("a cat", negative_prompt="blurry", guidance_scale=3.0, generator=_gen(), **SIZE).frames
    assert guided.shape == plain.shape and not np.array_equal(plain, guided)


def test_the_configs_guidance_is_the_default_and_survives_save_load(pipe, tmp_path):
    call = dict(prompt="a cat", negative_prompt="blurry", output_type="latent", **SIZE)
    guided = pipe(**call, guidance_scale=3.0, generator=_gen()).frames
    plain = pipe(**call, generator=_gen()).frames
    assert pipe.config.guidance_scale == 1.0
    assert torch.equal(plain, pipe(**call, guidance_scale=1.0, generator=_gen()).frames)
    assert (guided - plain).abs().max() > 1e-3  # 10x the tolerance below: the checks tell the two apart
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "guidance_scale": 3.0}))
    loaded = CausalWanPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.default_guidance_scale == 3.0
    torch.testing.assert_close(loaded(**call, generator=_gen()).frames, guided, atol=1e-4, rtol=0)
    torch.testing.assert_close(loaded(**call, guidance_scale=1.0, generator=_gen()).frames, plain, atol=1e-4, rtol=0)
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "guidance_scale": 0.5}))
    with pytest.raises(ValueError, match=r"guidance_scale=0.5 in the pipeline config must be a finite number >= 1"):
        CausalWanPipeline.from_pretrained(tmp_path)


def test_prompt_switch_changes_only_later_chunks(pipe):
    base = list(pipe.stream("a cat walks", generator=_gen(), **SIZE))
    switched = list(pipe.stream("a cat walks", generator=_gen(), prompt_schedule={2: "a red car drives"}, **SIZE))
    no_recache = list(pipe.stream("a cat walks", generator=_gen(), prompt_schedule={2: "a red car drives"},
                                  recache_on_switch=False, **SIZE))
    assert np.array_equal(base[0].frames, switched[0].frames) and np.array_equal(base[1].frames, switched[1].frames)
    assert not np.array_equal(base[2].frames, switched[2].frames)
    assert switched[2].prompt == ["a red car drives"]
    assert not np.array_equal(switched[2].frames, no_recache[2].frames)  # re-cache re-encodes the history


def test_long_stream_with_window_and_sink(pipe):
    """A stream longer than the window: 81 frames = 21 latent frames with a 9-frame window and a 3-frame sink."""
    out = pipe("waves crash on the rocks", generator=_gen(), num_frames=81, height=32, width=48,
               local_attn_size=9, sink_size=3, output_type="latent").frames
    assert out.shape == (1, 16, 21, 4, 6) and torch.isfinite(out).all()


def test_save_load_round_trip_and_hub_layout(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_causal_wan", "CausalWanPipeline"]
    assert index["transformer"] == ["causal_wan", "CausalWanTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchLCMScheduler"]
    assert (tmp_path / "pipeline_causal_wan.py").exists() and (tmp_path / "transformer" / "causal_wan.py").exists()

    expected = pipe("a cat walks", generator=_gen(), **SIZE).frames
    loaded = CausalWanPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, CausalWanTransformer3DModel)
    # fp32 kernels on memory-mapped weights may differ in the last bits
    np.testing.assert_allclose(loaded("a cat walks", generator=_gen(), **SIZE).frames, expected, atol=1e-4)

    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(generic).__name__ == "CausalWanPipeline"
    assert type(generic.transformer).__name__ == "CausalWanTransformer3DModel"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=32), r"num_frames=32 is not of the form 4k\+1; use 21 or 33"),
        (dict(num_frames=29), r"num_frames=29 \(8 latent frames\) does not fit the chunks .*; use 21 or 33"),
        (dict(num_frames=0), "use 9 or 21"),
        (dict(height=40), "height=40 must be a positive multiple of 16"),
        (dict(width=50), "width=50 must be a positive multiple of 16"),
        (dict(prompt=""), "is empty"),
        (dict(prompt=[]), "non-empty"),
        (dict(guidance_scale=0.5), "guidance_scale=0.5"),
        (dict(guidance_scale=float("nan")), "guidance_scale=nan must be a finite number"),
        (dict(num_videos_per_prompt=0), "num_videos_per_prompt=0 must be a positive integer"),
        (dict(max_sequence_length=0), "max_sequence_length=0 must be a positive integer"),
        (dict(local_attn_size=4, sink_size=2), "local_attn_size=4"),
        (dict(prompt_schedule={5: "x"}), "prompt_schedule key 5"),
        (dict(num_frames=4101), "beyond the RoPE table"),
    ],
)
def test_bad_input_fails_before_any_model_call(pipe, kwargs, match, monkeypatch):
    calls = []
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: calls.append(1))
    args = dict(prompt="a cat", **SIZE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe(**args)
    assert calls == []


def test_bf16_transformer_gets_exact_float32_timesteps(monkeypatch):
    pipe = tiny_pipeline(seed=0)
    pipe.transformer.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    original = pipe.transformer.forward

    def spy(hidden_states, timestep, *args, **kwargs):
        seen.append(timestep.detach().clone())
        return original(hidden_states, timestep, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    pipe("a cat", generator=_gen(), output_type="latent", **SIZE)
    assert all(t.dtype == torch.float32 for t in seen)
    assert sorted({float(t[0]) for t in seen}) == [0.0, 625.0, 833.0, 938.0, 1000.0]

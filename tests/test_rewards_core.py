"""Reward interface, weight-free proxies and the composer (Alg. 2 l.14-20). Fast, no model weights."""

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from rewards_fixtures import pan_video  # noqa: E402

from raven_video.rewards import (BlendSmoothness, FrameDifferenceMotion, RewardComposer, SharpnessDrift,  # noqa: E402
                                 TemporalFlicker, normalize_per_group, parse_reward_weights, to_uint8_videos,
                                 videos_from_numpy)


# ------------------------------------------------------------------ input layout
def test_uint8_and_float_inputs_give_identical_scores():
    video = pan_video(2.0)[None]
    as_float = video.float() / 127.5 - 1.0
    assert torch.equal(to_uint8_videos(as_float), video)
    r = FrameDifferenceMotion()
    assert torch.equal(r(video)["proxy_motion"], r(as_float)["proxy_motion"])


def test_numpy_pipeline_output_conversion():
    frames = np.random.rand(2, 5, 16, 24, 3).astype(np.float32)
    v = videos_from_numpy(frames)
    assert v.shape == (2, 5, 3, 16, 24) and v.dtype == torch.uint8
    assert int(v[1, 2, 0, 3, 4]) == int(round(frames[1, 2, 3, 4, 0] * 255))


@pytest.mark.parametrize(
    "shape, match",
    [((2, 5, 16, 16, 3), "permute\\(0, 1, 4, 2, 3\\)"), ((2, 3, 5, 16, 16), "permute\\(0, 2, 1, 3, 4\\)"),
     ((5, 3, 16, 16), "videos\\[None\\]"), ((16, 16), "\\[B, F, 3, H, W\\]")],
)
def test_wrong_layout_is_a_clear_error(shape, match):
    with pytest.raises(ValueError, match=match):
        TemporalFlicker()(torch.zeros(shape))


def test_single_frame_temporal_reward_errors():
    with pytest.raises(ValueError, match="at least 2 frames"):
        FrameDifferenceMotion()(torch.zeros(1, 1, 3, 8, 8))


def test_out_of_range_and_numpy_inputs_error():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        TemporalFlicker()(torch.full((1, 3, 3, 8, 8), 200.0))
    with pytest.raises(TypeError, match="videos_from_numpy"):
        TemporalFlicker()(np.zeros((1, 3, 3, 8, 8)))


# ------------------------------------------------------------------ proxies
def test_static_video_proxies():
    static = pan_video(0.0)[None]
    assert float(FrameDifferenceMotion()(static)["proxy_motion"]) == 0.0
    assert float(TemporalFlicker()(static)["proxy_flicker"]) == 1.0
    assert float(BlendSmoothness()(static)["proxy_smoothness"]) == 1.0
    assert abs(float(SharpnessDrift()(static)["proxy_sharpness_drift"])) < 1e-6


def test_proxy_motion_grows_with_pan_speed_and_is_batched():
    batch = torch.stack([pan_video(s) for s in (0.0, 1.0, 2.0, 4.0, 8.0)])
    m = FrameDifferenceMotion()(batch)["proxy_motion"]
    assert m.shape == (5,)
    assert all(a < b for a, b in zip(m[:-1], m[1:])), m
    single = FrameDifferenceMotion()(batch[2:3])["proxy_motion"]
    assert torch.allclose(single, m[2:3])


def test_proxy_smoothness_and_flicker_drop_when_frames_are_shuffled():
    video = pan_video(2.0, num_frames=13)[None]
    shuffled = video[:, torch.tensor([0, 7, 2, 9, 4, 11, 6, 1, 8, 3, 10, 5, 12])]
    assert BlendSmoothness()(shuffled)["proxy_smoothness"] < BlendSmoothness()(video)["proxy_smoothness"]
    assert TemporalFlicker()(shuffled)["proxy_flicker"] < TemporalFlicker()(video)["proxy_flicker"]


def test_sharpness_drift_detects_progressive_blur():
    video = pan_video(1.0, num_frames=10).float()
    kernel = torch.ones(1, 1, 5, 5) / 25
    blurred = video.clone()
    for t in range(5, 10):
        blurred[t] = torch.nn.functional.conv2d(video[t][:, None], kernel, padding=2)[:, 0]
    drift = SharpnessDrift()(blurred.round().to(torch.uint8)[None])["proxy_sharpness_drift"]
    assert float(drift) < -1.0


# ------------------------------------------------------------------ composer
def test_parse_reward_weights_raven_string_and_aliases():
    w = parse_reward_weights("dynamic_degree=0.35,text_alignment=2,aesthetic=1,imaging=1,motion_smoothness=0.75")
    assert w == {"dynamic_degree": 0.35, "text_alignment": 2.0, "aesthetic": 1.0, "imaging": 1.0,
                 "motion_smoothness": 0.75}
    assert parse_reward_weights("raft_RAFT=0.35, aq_AES=1") == {"dynamic_degree": 0.35, "aesthetic": 1.0}


@pytest.mark.parametrize(
    "spec, match",
    [("dynamic_degre=1", "unknown reward 'dynamic_degre'"), ("aesthetic=-1,imaging=0.5", "sum to -0.5"),
     ("aesthetic=abc", "bad weight 'abc'"), ("aesthetic", "expected 'name=weight'"), ("", "empty reward spec"),
     ("aesthetic=1,aq_AES=2", "given twice"), ("aesthetic=0", "all reward weights are zero"),
     ("aesthetic=nan", "finite")],
)
def test_bad_reward_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_reward_weights(spec)


def test_normalize_then_sum_matches_hand_computation():
    scores = {"proxy_motion": torch.tensor([1.0, 2.0, 3.0, 6.0]), "proxy_flicker": torch.tensor([0.5, 0.5, 0.5, 0.5])}
    comp = RewardComposer("proxy_motion=2,proxy_flicker=1", rewards=[FrameDifferenceMotion(), TemporalFlicker()])
    total = comp.aggregate(scores)
    v = np.array([1.0, 2.0, 3.0, 6.0])
    z = (v - v.mean()) / (max(v.std(), 1e-4) + 1e-5)  # population std, Alg. 2 l.14-20
    expected = (2 * z + 1 * 0.0) / 3.0  # zero-variance field contributes 0, not NaN
    assert torch.allclose(total.double(), torch.tensor(expected), atol=1e-6)
    assert torch.isfinite(total).all()


def test_normalize_per_group_and_degenerate_groups():
    v = torch.tensor([1.0, 3.0, 10.0, 10.0, 5.0])
    out = normalize_per_group(v, torch.tensor([0, 0, 1, 1, 2]))
    assert torch.allclose(out[:2], torch.tensor([-1.0, 1.0], dtype=torch.float64) / (1 + 1e-5))
    assert torch.equal(out[2:], torch.zeros(3, dtype=torch.float64))  # zero variance and singleton -> 0
    tiny = normalize_per_group(torch.tensor([0.0, 2e-5]))
    assert torch.allclose(tiny, torch.tensor([-1e-5, 1e-5], dtype=torch.float64) / (1e-4 + 1e-5))  # std clamp


def test_weighted_sum_and_negative_weights():
    comp = RewardComposer("proxy_motion=3,proxy_flicker=-1", rewards=[FrameDifferenceMotion(), TemporalFlicker()],
                          aggregation="weighted_sum")
    total = comp.aggregate({"proxy_motion": torch.tensor([0.2, 0.4]), "proxy_flicker": torch.tensor([0.9, 0.8])})
    assert torch.allclose(total, torch.tensor([(0.6 - 0.9) / 4, (1.2 - 0.8) / 4]))


def test_composer_end_to_end_and_errors():
    videos = torch.stack([pan_video(s) for s in (0.0, 2.0, 4.0, 8.0)])
    comp = RewardComposer("proxy_motion=1,proxy_smoothness=0.5", build_missing=True)
    out = comp(videos, group_ids=[0, 0, 1, 1])
    assert set(out) == {"proxy_motion", "proxy_smoothness", "total"} and out["total"].shape == (4,)
    assert out["total"][1] > out["total"][0] or out["proxy_smoothness"][1] < out["proxy_smoothness"][0]
    with pytest.raises(ValueError, match="no reward model provides 'aesthetic'"):
        RewardComposer("aesthetic=1", rewards=[])
    with pytest.raises(ValueError, match="unknown aggregation"):
        RewardComposer("proxy_motion=1", rewards=[FrameDifferenceMotion()], aggregation="mean")
    with pytest.raises(ValueError, match="lack weighted field"):
        comp.aggregate({"proxy_motion": torch.ones(2)})
    with pytest.raises(ValueError, match="group_ids has 3 entries"):
        comp.aggregate({"proxy_motion": torch.ones(2), "proxy_smoothness": torch.ones(2)}, group_ids=[0, 1, 2])
    assert not math.isnan(float(comp.aggregate({"proxy_motion": torch.ones(1), "proxy_smoothness": torch.ones(1)})))


def test_brightness_proxy():
    from raven_video.rewards import Brightness

    videos = torch.stack([torch.full((3, 3, 8, 8), 255, dtype=torch.uint8), torch.zeros(3, 3, 8, 8, dtype=torch.uint8)])
    out = Brightness()(videos)["proxy_brightness"]
    assert torch.allclose(out, torch.tensor([1.0, 0.0]), atol=1e-6)

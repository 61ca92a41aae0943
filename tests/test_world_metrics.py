"""World metrics: detector, prompt-conditioned scores, Fréchet distance, clip encoder (CPU, no network)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from raven_video.world import (
    ACCURACY_KEYS,
    ClipEncoder,
    clip_frechet_distance,
    detect_objects,
    encode_videos,
    feature_statistics,
    frechet_distance,
    load_encoder,
    render_clip,
    save_encoder,
    score_video,
    score_videos,
    train_encoder,
)


def _isolated(clip, t, gap=3.0):
    """Every object fully visible and at least ``gap`` px from every other one at frame ``t``."""
    tracks = clip.tracks
    if any(track.visible[t] < 0.999 for track in tracks):
        return False
    for a in range(len(tracks)):
        for b in range(a + 1, len(tracks)):
            reach = (tracks[a].size[t] + tracks[b].size[t]) / 2 + gap
            if abs(tracks[a].x[t] - tracks[b].x[t]) < reach and abs(tracks[a].y[t] - tracks[b].y[t]) < reach:
                return False
    return True


def _check_detections(clip, detections, centroid_tol):
    checked = 0
    for t, found in enumerate(detections):
        if not _isolated(clip, t):
            continue
        assert len(found) == len(clip.scene.objects), (clip.seed, t, found)
        by_colour = {d.colour: d for d in found}
        for obj, track in zip(clip.scene.objects, clip.tracks):
            d = by_colour[obj.colour]
            assert d.shape == obj.shape, (clip.seed, t, obj, d)
            assert np.hypot(d.x - track.x[t], d.y - track.y[t]) < centroid_tol, (clip.seed, t, obj, d)
            checked += 1
    return checked


# ------------------------------------------------------------------------------------------------ detector


def test_detector_recovers_ground_truth_on_clean_clips():
    counts, backgrounds, checked = set(), set(), 0
    for seed in range(24):
        for size in (64, 32):
            split = "heldout" if seed % 4 == 0 else "train"
            clip = render_clip(seed, num_frames=41, height=size, width=size, split=split)
            checked += _check_detections(clip, detect_objects(clip.frames), centroid_tol=0.5)
            counts.add(len(clip.scene.objects))
            backgrounds.add(clip.scene.background)
    assert counts == {1, 2, 3} and backgrounds == {"black", "gray", "white"} and checked > 2000


def test_detector_is_robust_to_mild_blur_and_noise():
    rng = np.random.default_rng(0)
    checked = 0
    for seed in range(8):
        clip = render_clip(seed, num_frames=21)
        blurred = ndimage.gaussian_filter(clip.frames.astype(np.float32), (0, 0.7, 0.7, 0))
        noisy = np.clip(np.rint(blurred + rng.normal(0, 4, blurred.shape)), 0, 255).astype(np.uint8)
        checked += _check_detections(clip, detect_objects(noisy), centroid_tol=1.0)
    assert checked > 200


def test_detector_accepts_float_frames_and_a_given_background():
    clip = render_clip(5, num_frames=5)
    as_float = detect_objects(clip.frames.astype(np.float32) / 255.0, background=clip.scene.background)
    assert as_float == detect_objects(clip.frames)
    with pytest.raises(ValueError, match="unknown background 'blue'"):
        detect_objects(clip.frames, background="blue")


# ------------------------------------------------------------------------------------------------ scores


def test_real_clips_score_near_one_and_corruptions_score_lower():
    rng = np.random.default_rng(0)
    own, mismatched, shuffled, noise = [], [], [], []
    for seed in range(10):
        clip = render_clip(seed, num_frames=81)
        other = render_clip(seed + 500, num_frames=1)
        score = score_video(clip.frames, clip.prompt)
        assert set(ACCURACY_KEYS) | {"speed_error", "world_score"} == set(score.summary)
        assert all(0 <= score.summary[k] <= 1 for k in ACCURACY_KEYS if not np.isnan(score.summary[k]))
        own.append(score)
        mismatched.append(score_video(clip.frames, other.prompt).world_score)
        shuffled.append(score_video(clip.frames[rng.permutation(81)], clip.prompt))
        noise.append(score_video(rng.integers(0, 256, clip.frames.shape, dtype=np.uint8), clip.prompt).world_score)
    assert min(s.world_score for s in own) > 0.95 and np.mean([s.world_score for s in own]) > 0.98
    assert all(s.summary["count_accuracy"] > 0.9 and s.summary["colour_accuracy"] > 0.95 for s in own)
    assert np.mean(mismatched) < 0.5 and np.mean(noise) < 0.3
    own_direction = np.nanmean([s.summary["direction_accuracy"] for s in own])
    shuffled_direction = np.nanmean([s.summary["direction_accuracy"] for s in shuffled])
    assert own_direction > 0.98 and shuffled_direction < own_direction - 0.3
    assert np.mean([s.world_score for s in shuffled]) < np.mean([s.world_score for s in own]) - 0.15


def test_windows_cover_1x_2x_4x_lengths():
    clip = render_clip(21, num_frames=321)  # one object bouncing off the walls
    for frames, bounds in ((81, ((0, 81),)), (161, ((0, 81), (81, 161))),
                           (321, ((0, 81), (81, 162), (162, 243), (243, 321)))):
        score = score_video(clip.frames[:frames], clip.prompt)
        assert score.window_bounds == bounds
        assert all(w["world_score"] > 0.95 for w in score.windows)
    static = score_video(np.repeat(clip.frames[:1], 321, axis=0), clip.prompt)
    assert max(w["direction_accuracy"] for w in static.windows) < 0.1


def test_bounces_must_happen_at_walls_and_only_there():
    clip = render_clip(21, num_frames=81)  # one circle, quickly down-left, bounces at frames 4, 35, 47, 79
    first, second = np.flatnonzero(clip.tracks[0].bounce)[:2]
    assert score_video(clip.frames, clip.prompt).summary["bounce_accuracy"] == 1.0
    stuck = clip.frames.copy()
    stuck[second:] = stuck[second]  # reaches a wall and stays there
    turn = (first + second) // 2
    turned = np.concatenate([clip.frames[:turn], clip.frames[turn - 1::-1]])[:81]  # reverses mid-screen
    for frames in (stuck, turned):
        summary = score_video(frames, clip.prompt).summary
        assert summary["bounce_accuracy"] < 0.7 and summary["direction_accuracy"] < 0.6


def test_score_videos_averages_and_checks_lengths():
    clips = [render_clip(seed, num_frames=41) for seed in (1, 2)]
    means = score_videos([c.frames for c in clips], [c.prompt for c in clips], window=20)
    single = [score_video(c.frames, c.prompt, window=20) for c in clips]
    assert means["world_score"] == pytest.approx(np.mean([s.world_score for s in single]))
    assert {"window0/world_score", "window1/count_accuracy"} <= set(means)
    with pytest.raises(ValueError, match="2 videos for 3 prompts"):
        score_videos([c.frames for c in clips], [c.prompt for c in clips] + ["x"])
    with pytest.raises(ValueError, match="more videos than the 1 prompts"):
        score_videos([c.frames for c in clips], [clips[0].prompt])
    with pytest.raises(ValueError, match="unknown word 'dog'"):
        score_video(clips[0].frames, "a dog runs")


# ------------------------------------------------------------------------------------------------ Fréchet


def test_frechet_distance_matches_the_gaussian_closed_form():
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 4 + 9 - 2 * 6)
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([4.0, 0.5, 3.0])
    expected = 3.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2)) == pytest.approx(expected)
    features = np.random.default_rng(0).normal(size=(200, 6))
    mu, sigma = feature_statistics(features)
    assert mu.shape == (6,) and sigma.shape == (6, 6) and np.allclose(sigma, np.cov(features.T))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    few = feature_statistics(features[:3])  # singular covariance
    assert frechet_distance(*few, *few) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# ------------------------------------------------------------------------------------------------ encoder


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions run fastest on one thread, and do not stall when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_encoder_training_reduces_the_loss_and_round_trips(tmp_path, one_torch_thread):
    model, losses = train_encoder(30, batch_size=8, seed=0, num_frames=17, height=32, width=32)
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 300_000
    save_encoder(model, str(tmp_path / "enc"))
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "encoder.safetensors"]
    loaded = load_encoder(str(tmp_path / "enc"))
    videos = [render_clip(seed, num_frames=17, height=32, width=32).frames for seed in range(5)]
    features = encode_videos(loaded, videos, batch_size=2)
    assert features.shape == (5, 64) and np.allclose(features, encode_videos(model, videos))
    assert clip_frechet_distance(loaded, videos, videos) == pytest.approx(0.0, abs=1e-6)
    longer = torch.zeros(1, 3, 81, 64, 64)
    assert ClipEncoder()(longer).shape == (1, 64)
    with pytest.raises(FileNotFoundError, match="save_encoder"):
        load_encoder(str(tmp_path / "missing"))

"""VBench aggregation, sampling harness (naming, seeds, resume, atomic writes), static filter, reward eval, CLI."""

import json
import os

import numpy as np
import pytest
import torch

from raven_video.eval.__main__ import main
from raven_video.eval.pipeline_utils import SyntheticVideoPipeline
from raven_video.eval.reward_eval import evaluate_rewards, summarize_scores
from raven_video.eval.vbench_harness import (load_vbench_prompts, plan_vbench_samples, sample_videos,
                                             score_vbench_results, static_filter)
from raven_video.eval.vbench_scores import VBENCH_DIMENSIONS, aggregate_vbench
from raven_video.utils.video_io import read_video, save_video


def test_vbench_aggregation_equals_hand_computation():
    raw = {d: 0.5 for d in VBENCH_DIMENSIONS}
    raw.update(subject_consistency=0.95, motion_smoothness=0.98, dynamic_degree=0.6, scene=0.4, appearance_style=0.2)
    r = aggregate_vbench(raw)
    q = ((0.95 - 0.1462) / (1 - 0.1462) + (0.5 - 0.2615) / (1 - 0.2615) + (0.5 - 0.6293) / (1 - 0.6293)
         + (0.98 - 0.706) / (0.9975 - 0.706) + 0.5 * 0.6 + 0.5 + 0.5) / 6.5
    s = (0.5 * 5 + 0.4 / 0.8222 + (0.2 - 0.0009) / (0.2855 - 0.0009) + 0.5 / 0.364 + 0.5 / 0.364) / 9
    assert r["quality"] == pytest.approx(q, abs=1e-12)
    assert r["semantic"] == pytest.approx(s, abs=1e-12)
    assert r["total"] == pytest.approx((4 * q + s) / 5, abs=1e-12)
    assert r["missing"] == []


def test_vbench_partial_and_unknown_dimensions():
    r = aggregate_vbench({"dynamic_degree": 1.0})
    assert r["quality"] == pytest.approx(0.5 / 6.5) and r["semantic"] == 0.0
    assert len(r["missing"]) == 15
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        aggregate_vbench({"dynamic": 1.0})


def test_score_vbench_result_files(tmp_path):
    (tmp_path / "raven_eval_results.json").write_text(
        json.dumps({"dynamic_degree": [0.6, [{"video_path": "a.mp4", "video_results": True}]],
                    "aesthetic_quality": [0.55, []]}))
    summary = score_vbench_results([str(tmp_path)], str(tmp_path))
    assert summary["raw"] == {"dynamic_degree": 0.6, "aesthetic_quality": 0.55}
    assert summary["quality"] == pytest.approx((0.3 + 0.55) / 6.5)
    assert "| **Total** |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["total"] == pytest.approx(summary["total"])


def test_vbench_prompt_suite_and_plan(tmp_path):
    prompts = load_vbench_prompts()  # from the vbench wheel
    assert len(prompts) == len(set(prompts)) == 944 and prompts[0] == "In a still frame, a stop sign"
    jobs = plan_vbench_samples(prompts, str(tmp_path))
    assert len(jobs) == 75 * 25 + (944 - 75) * 5
    assert jobs[0].path.endswith("flicker_candidates/In a still frame, a stop sign-0.mp4")
    assert jobs[75 * 25].path == os.path.join(str(tmp_path), "videos", f"{prompts[75]}-0.mp4")
    assert [j.seed for j in jobs[:3]] == [20001019, 20001020, 20001021]
    with pytest.raises(ValueError, match="must match"):
        plan_vbench_samples(prompts[:3], str(tmp_path), extended_prompts=["x"])


def test_sampling_is_resumable_and_atomic(tmp_path):
    calls = []

    class CountingPipe(SyntheticVideoPipeline):
        def __call__(self, prompt, **kw):
            calls.append(list(prompt))
            return super().__call__(prompt, **kw)

    prompts = ["a cat", "a dog", "a red car"]
    jobs = plan_vbench_samples(prompts, str(tmp_path), ["ext cat", "ext dog", "ext car"], samples_per_prompt=2,
                               num_flicker_prompts=1, flicker_samples=3)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / ".a dog-0.tmp-stale.mp4").write_bytes(b"junk")  # a killed AtomicVideoWriter
    n = sample_videos(CountingPipe(), jobs, batch_size=3, num_frames=5, height=32, width=48, progress=False)
    assert n == 7 and calls[0] == ["ext cat"] * 3
    names = sorted(os.listdir(tmp_path / "videos"))
    assert names == ["a dog-0.mp4", "a dog-1.mp4", "a red car-0.mp4", "a red car-1.mp4"]  # stale partial removed
    frames, fps = read_video(str(tmp_path / "videos" / "a dog-1.mp4"))
    assert frames.shape == (5, 32, 48, 3) and fps == pytest.approx(16.0)
    os.remove(tmp_path / "videos" / "a red car-1.mp4")
    calls.clear()
    assert sample_videos(CountingPipe(), jobs, batch_size=3, num_frames=5, height=32, width=48, progress=False) == 1
    assert calls == [["ext car"]]


def test_atomic_writer_leaves_no_partial_file(tmp_path):
    with pytest.raises(ValueError):
        save_video(np.zeros((3, 8, 8)), str(tmp_path / "x.mp4"))
    assert os.listdir(tmp_path) == []


def test_bad_pipeline_output_is_a_clear_error(tmp_path):
    jobs = plan_vbench_samples(["a"], str(tmp_path), num_flicker_prompts=0, samples_per_prompt=1)
    with pytest.raises(ValueError, match="output_type='np'"):
        sample_videos(lambda **kw: np.zeros((1, 5, 3, 8, 8)), jobs, num_frames=5, height=8, width=8, progress=False)


def test_static_filter_keeps_first_static_candidates(tmp_path):
    from raven_video.rewards import DynamicDegreeReward

    rng = np.random.default_rng(0)
    base = (rng.random((64, 200, 3)) * 255).astype(np.uint8)
    base = np.asarray(torch.nn.functional.avg_pool2d(torch.from_numpy(base).permute(2, 0, 1).float()[None], 5, 1, 2)
                      [0].permute(1, 2, 0)).astype(np.uint8)
    cand = tmp_path / "flicker_candidates"
    cand.mkdir()
    for i, speed in enumerate([6, 0, 6, 0, 0]):
        video = np.stack([base[:, speed * t : speed * t + 64] for t in range(9)])
        save_video(video, str(cand / f"a still cup-{i}.mp4"), crf=18)
    record = static_filter(DynamicDegreeReward(flow_backend="farneback"), str(tmp_path), ["a still cup"],
                           num_flicker_prompts=1, flicker_samples=5, keep=2, progress=False)
    assert record["a still cup"]["static"] == [1, 3]
    assert sorted(os.listdir(tmp_path / "videos")) == ["a still cup-0.mp4", "a still cup-1.mp4"]
    assert (tmp_path / "videos" / "a still cup-1.mp4").read_bytes() == (cand / "a still cup-3.mp4").read_bytes()


def test_reward_eval_mean_std(tmp_path):
    from raven_video.rewards import FrameDifferenceMotion, TemporalFlicker

    result = evaluate_rewards([FrameDifferenceMotion(), TemporalFlicker()], pipe=SyntheticVideoPipeline(),
                              prompts=["a", "b"], samples_per_prompt=2, num_frames=5, height=24, width=32,
                              batch_size=3, save_dir=str(tmp_path), progress=False)
    vals = [row["proxy_motion"] for row in result["videos"]]
    assert len(vals) == 4 and len(os.listdir(tmp_path)) == 4
    assert result["summary"]["proxy_motion"]["mean"] == pytest.approx(np.mean(vals))
    assert result["summary"]["proxy_motion"]["std"] == pytest.approx(np.std(vals))
    assert summarize_scores([{"x": 1.0}, {"x": 3.0}])["x"] == {"mean": 2.0, "std": 1.0, "n": 2}


def test_cli_sample_static_filter_rewards_score(tmp_path, capsys):
    out = str(tmp_path / "run")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a still cup\na dog runs\n")
    common = ["--num_frames", "5", "--height", "32", "--width", "48", "--device", "cpu"]
    assert main(["--quiet", "sample", "--pipeline", "synthetic", "--out_dir", out, "--prompts", str(prompts),
                 "--num_flicker_prompts", "1", "--flicker_samples", "2", "--samples_per_prompt", "2", *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 4
    assert main(["--quiet", "static-filter", "--out_dir", out, "--prompts", str(prompts), "--flow_backend",
                 "farneback", "--num_flicker_prompts", "1", "--flicker_samples", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["--quiet", "rewards", "--videos_dir", os.path.join(out, "videos"), "--out_dir", out,
                 "--rewards", "proxy_motion,proxy_flicker"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"proxy_motion", "proxy_flicker"}
    assert os.path.exists(os.path.join(out, "rewards.md")) and os.path.exists(os.path.join(out, "rewards.json"))
    with pytest.raises(SystemExit, match="unknown reward"):
        main(["--quiet", "rewards", "--videos_dir", out, "--out_dir", out, "--rewards", "nope"])
    res = tmp_path / "x_eval_results.json"
    res.write_text(json.dumps({"imaging_quality": [0.65, []]}))
    assert main(["score", str(res)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quality"] == pytest.approx(0.65 / 6.5)


def test_harness_with_the_real_tiny_causal_pipeline(tmp_path):
    """The harness drives the real CausalWanPipeline (batched prompts, one seeded generator per video)."""
    from raven_video.eval.pipeline_utils import load_pipeline
    from raven_video.rewards import FrameDifferenceMotion

    pipe = load_pipeline("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    jobs = plan_vbench_samples(["a cat", "a dog"], str(tmp_path), ["a cat walks", "a dog runs"], samples_per_prompt=1,
                               num_flicker_prompts=0)
    assert sample_videos(pipe, jobs, batch_size=2, num_frames=9, height=32, width=48, progress=False) == 2
    frames, _ = read_video(jobs[0].path)
    assert frames.shape == (9, 32, 48, 3)
    result = evaluate_rewards([FrameDifferenceMotion()], pipe=pipe, prompts=["a cat"], samples_per_prompt=2,
                              num_frames=9, height=32, width=48, batch_size=2, progress=False)
    assert len(result["videos"]) == 2 and np.isfinite(result["summary"]["proxy_motion"]["mean"])

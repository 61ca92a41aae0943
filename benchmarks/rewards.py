"""Time and peak memory of every reward on a batch of videos with random weights; prints ONE JSON line.

GPU (the lead's measurement): ``python benchmarks/rewards.py`` -> 4 videos x 81 frames x 480x832, fp32 RAFT/AMT
(as VBench/RAVEN), bf16 CLIP/MUSIQ/VideoAlign (as RAVEN). CPU check: ``python benchmarks/rewards.py --tiny``.

Random weights have exactly the FLOPs and memory of the real ones. Extra wheels needed on the GPU image (torch 2.11,
torchvision 0.26, transformers 5.17 present), all with ``--no-deps``:
open_clip_torch==3.3.0 ftfy wcwidth regex pyiqa==0.1.16 sentencepiece vbench==0.1.5 decord==0.6.0 easydict (see docs/rewards_eval.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes and a tiny VideoAlign model (CPU check)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--rewards", default="dynamic_degree,motion_smoothness,aesthetic,imaging,text_alignment,proxies")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the minimum is reported")
    args = p.parse_args()

    from raven_video.rewards import (AestheticReward, BlendSmoothness, DynamicDegreeReward, FrameDifferenceMotion,
                                     ImagingQualityReward, MotionSmoothnessReward, SharpnessDrift, TemporalFlicker,
                                     VideoAlignReward)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny
    b = args.batch or (1 if tiny else 4)
    f = args.frames or (9 if tiny else 81)
    h = args.height or (128 if tiny else 480)
    w = args.width or (128 if tiny else 832)
    low = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    videos = torch.rand(b, f, 3, h, w, device=device) * 2 - 1
    prompts = ["a corgi running on a beach at sunset, cinematic"] * b

    builders = {
        "dynamic_degree": lambda: DynamicDegreeReward(random_init=True, device=device,
                                                      num_flow_updates=2 if tiny else 20),
        "motion_smoothness": lambda: MotionSmoothnessReward(random_init=True, device=device),
        "aesthetic": lambda: AestheticReward(random_init=True, device=device, dtype=low),
        "imaging": lambda: ImagingQualityReward(random_init=True, device=device, dtype=low),
        "proxies": None,
    }
    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from rewards_fixtures import tiny_qwen2vl_config, tiny_qwen2vl_tokenizer

        cfg = tiny_qwen2vl_config()
        builders["text_alignment"] = lambda: VideoAlignReward(random_init=True, config=cfg,
                                                              tokenizer=tiny_qwen2vl_tokenizer(cfg), device=device)
        builders["aesthetic"] = lambda: AestheticReward(random_init=True, device=device, model_name="ViT-B-32-quickgelu")
    else:
        builders["text_alignment"] = lambda: VideoAlignReward(random_init=True, device=device, dtype=low)

    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "shape": [b, f, 3, h, w], "tiny": tiny, "time_s": {}, "peak_mem_gb": {}, "build_s": {}}
    for name in [n.strip() for n in args.rewards.split(",") if n.strip()]:
        if name == "proxies":
            rewards = [FrameDifferenceMotion(device=device), TemporalFlicker(device=device),
                       BlendSmoothness(device=device), SharpnessDrift(device=device)]
        else:
            t0 = time.perf_counter()
            rewards = [builders[name]().load()]
            result["build_s"][name] = round(time.perf_counter() - t0, 3)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            for r in rewards:
                r(videos, prompts=prompts if r.needs_prompts else None, fps=16.0)
            if cuda:
                torch.cuda.synchronize()
            if i > 0 or args.repeats == 0:
                times.append(time.perf_counter() - t0)
        result["time_s"][name] = round(min(times), 4)
        result["peak_mem_gb"][name] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
        del rewards
    print(json.dumps(result))


if __name__ == "__main__":
    main()

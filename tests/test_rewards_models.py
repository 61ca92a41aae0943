"""Model-based rewards with random weights and checkpoints written in the official key layouts (no downloads)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from rewards_fixtures import (pan_video, tiny_openai_clip_state_dict, tiny_qwen2vl_config,  # noqa: E402
                              tiny_qwen2vl_tokenizer)

from raven_video.rewards import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()


# ------------------------------------------------------------------ dynamic degree (RAFT)
def _princeton_raft():
    pytest.importorskip("easydict")
    raft_mod = pytest.importorskip("vbench.third_party.RAFT.core.raft")
    from easydict import EasyDict

    return raft_mod.RAFT(EasyDict(small=False, mixed_precision=False, alternate_corr=False)).eval()


def test_raft_things_checkpoint_loads_and_matches_vbench_raft(tmp_path):
    from raven_video.rewards.base import pad_to_multiple
    from raven_video.rewards.dynamic_degree import DynamicDegreeReward

    torch.manual_seed(0)
    ref = _princeton_raft()
    path = tmp_path / "raft-things.pth"
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)  # DataParallel layout, 179 tensors
    reward = DynamicDegreeReward(str(tmp_path), num_flow_updates=4, device="cpu").load()  # folder -> raft-things.pth
    a = pan_video(3.0, num_frames=2, size=128, y0=100)
    with torch.no_grad():
        ours = reward._flow(a[:1], a[1:])
        _, theirs = ref(pad_to_multiple(a[:1].float(), 8), pad_to_multiple(a[1:].float(), 8), iters=4, test_mode=True)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_raft_dynamic_degree_shapes_random_init():
    from raven_video.rewards import DynamicDegreeReward

    torch.manual_seed(0)
    reward = DynamicDegreeReward(random_init=True, num_flow_updates=2)
    videos = torch.stack([pan_video(s, num_frames=5, size=128) for s in (0.0, 2.0)])
    out = reward(videos, fps=16.0)  # 5 frames @16 fps -> frames 0, 2, 4 -> 2 pairs per video
    assert set(out) == {"dynamic_degree", "dynamic_degree_vbench"}
    assert out["dynamic_degree"].shape == (2,) and torch.isfinite(out["dynamic_degree"]).all()
    assert reward.frame_indices(81, 16.0) == list(range(0, 81, 2))
    with pytest.raises(ValueError, match="128x128"):
        reward(torch.zeros(1, 3, 3, 64, 64, dtype=torch.uint8), fps=8.0)


def test_dynamic_degree_grows_with_pan_speed_over_real_photo():
    from raven_video.rewards import DynamicDegreeReward

    speeds = (0.0, 1.0, 2.0, 4.0, 6.0)
    videos = torch.stack([pan_video(s, num_frames=9, size=96, name="astronaut", y0=60, x0=40) for s in speeds])
    dd = DynamicDegreeReward(flow_backend="farneback")(videos, fps=16.0)["dynamic_degree"]
    assert all(a < b for a, b in zip(dd[:-1], dd[1:])), dd
    # 16 fps -> every 2nd frame: displacement per pair = 2 * speed; top-5 % magnitude ~ that displacement
    assert float(dd[0]) < 0.2 and abs(float(dd[2]) - 4.0) < 1.0, dd


def test_vbench_binary_and_static_rules():
    from raven_video.rewards.dynamic_degree import vbench_is_static

    # T=16: thres 3*64/256 = 0.75, count_num 2; regular pairs above thres: 2 -> static, 3 -> not
    assert vbench_is_static([1.0, 1.0] + [0.1] * 13 + [0.5, 0.5], 16, 64)
    assert not vbench_is_static([1.0, 1.0, 1.0] + [0.1] * 12 + [0.5, 0.5], 16, 64)
    assert not vbench_is_static([0.1] * 15 + [3.1, 0.5], 16, 64)  # wrap-around 3.1 > 0.75 * 2 * 2


# ------------------------------------------------------------------ motion smoothness (AMT-S)
class _MeanInterpolator(torch.nn.Module):
    """Stand-in with AMT's call signature: the midpoint as the mean of the neighbours."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, img0, img1, embt, scale_factor=1.0, eval=True):
        return {"imgt_pred": (img0 + img1) / 2}


def test_motion_smoothness_pipeline_formula_and_shuffle():
    from raven_video.rewards import MotionSmoothnessReward

    reward = MotionSmoothnessReward(model=_MeanInterpolator())
    video = pan_video(2.0, num_frames=9, size=40)[None]
    score = float(reward(video)["motion_smoothness"])
    x = video[0].float() / 255
    pred = ((x[0:-1:2] + x[2::2]) / 2 * 255).clamp(0, 255).to(torch.uint8).float()  # truncation like tensor2img
    expected = (255 - (pred - video[0, 1::2].float()).abs().mean()) / 255
    assert abs(score - float(expected)) < 1e-6
    shuffled = video[:, torch.tensor([0, 5, 2, 7, 4, 1, 6, 3, 8])]
    reordered = video[:, torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])]
    assert float(reward(shuffled)["motion_smoothness"]) < score
    assert float(reward(reordered)["motion_smoothness"]) < score


def test_amt_s_random_init_and_official_checkpoint(tmp_path):
    pytest.importorskip("vbench")
    from raven_video.rewards import MotionSmoothnessReward
    from raven_video.rewards.motion_smoothness import build_amt_s

    torch.manual_seed(0)
    ref = build_amt_s()
    assert sum(p.numel() for p in ref.parameters()) == 2990543  # AMT-S
    path = tmp_path / "amt-s.pth"
    torch.save({"state_dict": ref.state_dict(), "epoch": 300}, path)  # official {'state_dict': ...} layout
    reward = MotionSmoothnessReward(str(path)).load()
    for a, b in zip(reward.model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    out = reward(pan_video(1.0, num_frames=5, size=64)[None])["motion_smoothness"]
    assert out.shape == (1,) and 0.0 <= float(out) <= 1.0
    with pytest.raises(ValueError, match="at least 3 frames"):
        reward(torch.zeros(1, 2, 3, 32, 32, dtype=torch.uint8))


# ------------------------------------------------------------------ aesthetic (CLIP + LAION head)
def test_aesthetic_loads_openai_layout_and_laion_head(tmp_path):
    pytest.importorskip("open_clip")
    import torch.nn.functional as F

    from raven_video.rewards import AestheticReward
    from raven_video.rewards.aesthetic import vbench_clip_transform

    sd = tiny_openai_clip_state_dict(embed_dim=32)
    torch.save(sd, tmp_path / "ViT-L-14.pt")
    head = torch.nn.Linear(32, 1)
    torch.save(head.state_dict(), tmp_path / "sa_0_4_vit_l_14_linear.pth")  # {'weight', 'bias'}
    reward = AestheticReward(str(tmp_path / "ViT-L-14.pt"), str(tmp_path / "sa_0_4_vit_l_14_linear.pth")).load()
    # open_clip builds OpenAI models in fp16 first (the official file is fp16): equal up to fp16 rounding
    assert torch.equal(reward.model.conv1.weight, sd["visual.conv1.weight"].half().float())
    videos = torch.stack([pan_video(s, num_frames=2, size=80) for s in (0.0, 3.0)])
    out = reward(videos)["aesthetic"]
    assert out.shape == (2,)
    with torch.no_grad():
        x = vbench_clip_transform(videos[0])
        manual = head(F.normalize(reward.model(x), dim=-1)).squeeze(-1).mean() / 10
    assert torch.allclose(out[0], manual, atol=1e-5)
    assert vbench_clip_transform(torch.zeros(1, 3, 480, 832, dtype=torch.uint8)).shape == (1, 3, 224, 224)
    torch.save({"layers.0.weight": torch.zeros(1)}, tmp_path / "mlp.pth")
    with pytest.raises(ValueError, match="LAION linear head"):
        AestheticReward(str(tmp_path / "ViT-L-14.pt"), str(tmp_path / "mlp.pth")).load()


def test_missing_checkpoints_are_clear_errors(tmp_path):
    from raven_video.rewards import AestheticReward, DynamicDegreeReward, ImagingQualityReward

    with pytest.raises(ValueError, match="random_init=True"):
        DynamicDegreeReward()
    with pytest.raises(ValueError, match="head_checkpoint"):
        AestheticReward(clip_checkpoint="x.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImagingQualityReward(str(tmp_path / "nope.pth")).load()


# ------------------------------------------------------------------ imaging (MUSIQ)
def test_musiq_official_checkpoint_and_longer_resize(tmp_path):
    pytest.importorskip("pyiqa")
    from raven_video.rewards import ImagingQualityReward
    from raven_video.rewards.imaging_quality import build_musiq, vbench_longer_resize

    assert vbench_longer_resize(torch.zeros(1, 3, 480, 832, dtype=torch.uint8)).shape == (1, 3, 295, 512)
    assert vbench_longer_resize(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 3, 64, 64)
    torch.manual_seed(0)
    ref = build_musiq()
    torch.save(ref.state_dict(), tmp_path / "musiq_spaq_ckpt-358bb6af.pth")
    reward = ImagingQualityReward(str(tmp_path)).load()
    assert torch.equal(reward.model.head.weight, ref.head.weight)
    out = reward(torch.stack([pan_video(0.0, num_frames=1, size=48), pan_video(0.0, num_frames=1, size=48, y0=0)]))
    assert out["imaging"].shape == (2,) and torch.isfinite(out["imaging"]).all()


# ------------------------------------------------------------------ text alignment (VideoAlign)
def test_videoalign_preprocessing_constants():
    from raven_video.rewards.text_alignment import sample_frame_indices, videoalign_resize

    idx = sample_frame_indices(81, 16.0)
    assert idx == torch.linspace(0, 80, 10).round().long().tolist() and len(idx) == 10
    assert videoalign_resize(torch.zeros(1, 3, 480, 832, dtype=torch.uint8)).shape == (1, 3, 336, 588)


def test_videoalign_patch_layout_matches_transformers_image_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from raven_video.rewards.text_alignment import qwen2vl_video_patches

    img = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    ours, grid = qwen2vl_video_patches(img[None].float())  # one frame, padded to 2 by repetition
    proc = Qwen2VLImageProcessor(do_resize=False)
    theirs = proc(images=[img], return_tensors="pt")
    assert grid.tolist() == theirs["image_grid_thw"].tolist()
    assert torch.allclose(ours, theirs["pixel_values"].float(), atol=1e-4)


def _tiny_videoalign(**kw):
    from raven_video.rewards import VideoAlignReward

    cfg = tiny_qwen2vl_config()
    return VideoAlignReward(random_init=True, config=cfg, tokenizer=tiny_qwen2vl_tokenizer(cfg), **kw)


def test_videoalign_random_tiny_model_shapes():
    torch.manual_seed(0)
    reward = _tiny_videoalign()
    videos = torch.stack([pan_video(s, num_frames=17, size=56) for s in (0.0, 2.0)])
    out = reward(videos, prompts=["a cat", "a dog running on the beach"], fps=16.0)
    assert set(out) == {"text_alignment", "videoalign_vq", "videoalign_mq", "videoalign_overall"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())
    assert torch.allclose(out["videoalign_overall"], out["videoalign_vq"] + out["videoalign_mq"] + out["text_alignment"])
    with pytest.raises(ValueError, match="one prompt per video"):
        reward(videos, prompts=["only one"])


def test_videoalign_loads_official_peft_checkpoint(tmp_path):
    from peft import LoraConfig, get_peft_model

    from raven_video.rewards import VideoAlignReward
    from raven_video.rewards.text_alignment import _reward_model_class

    torch.manual_seed(0)
    cfg = tiny_qwen2vl_config()
    base_dir = tmp_path / "Qwen2-VL-2B-Instruct"
    cfg.save_pretrained(base_dir)
    tok = tiny_qwen2vl_tokenizer(cfg)
    tok.save_pretrained(base_dir)
    # training-side model: reward head + LoRA on the LM's linear layers (VideoAlign: r64/alpha128; tiny: r4/alpha8)
    model = _reward_model_class()(cfg, output_dim=1)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "visual" not in n
               and n not in ("lm_head", "rm_head")]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    sd = peft_model.state_dict()
    old = {}  # transformers-4.4x names, as in VideoReward's model.pth
    for k, v in sd.items():
        k = k.replace("base_model.model.model.language_model.", "base_model.model.model.")
        k = k.replace("base_model.model.model.visual.", "base_model.model.visual.")
        old[k] = v
    ckpt_dir = tmp_path / "VideoReward"
    (ckpt_dir / "checkpoint-11352").mkdir(parents=True)
    torch.save(old, ckpt_dir / "checkpoint-11352" / "model.pth")
    (ckpt_dir / "model_config.json").write_text(json.dumps({"peft_lora_config": {"lora_r": 4, "lora_alpha": 8}}))

    reward = VideoAlignReward(str(base_dir), str(ckpt_dir)).load()
    video = pan_video(1.0, num_frames=9, size=56)[None]
    out = reward(video, prompts=["a cat"], fps=8.0, )
    inputs = reward.build_inputs(video, ["a cat"], 8.0)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
        raw = merged.reward_logits(**inputs, special_token_ids=reward.special_token_ids)
    assert torch.allclose(out["text_alignment"], (raw[:, 2] - 2.8105) / 2.5121, atol=1e-5)
    torch.save({k: v for k, v in old.items() if ".lora_" not in k}, ckpt_dir / "checkpoint-11352" / "model.pth")
    with pytest.raises(ValueError, match="no LoRA"):
        VideoAlignReward(str(base_dir), str(ckpt_dir)).load()

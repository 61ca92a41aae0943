"""Shared fixtures for the reward / eval tests: synthetic videos over real photos and tiny models (no downloads)."""

from __future__ import annotations

import numpy as np
import torch


def photo(name: str = "astronaut") -> torch.Tensor:
    """A real photo shipped with scikit-image, uint8 [3, H, W]."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)


def pan_video(speed: float, num_frames: int = 9, size: int = 64, name: str = "astronaut", y0: int = 120,
              x0: int = 100) -> torch.Tensor:
    """Horizontal camera pan of ``speed`` px/frame over a photo (bilinear sub-pixel), uint8 [F, 3, size, size]."""
    img = photo(name).float()
    frames = []
    for t in range(num_frames):
        x = x0 + speed * t
        i = int(np.floor(x))
        a = x - i
        win = (1 - a) * img[:, y0 : y0 + size, i : i + size] + a * img[:, y0 : y0 + size, i + 1 : i + 1 + size]
        frames.append(win.round().clamp(0, 255).to(torch.uint8))
    return torch.stack(frames)


def tiny_openai_clip_state_dict(embed_dim: int = 32, seed: int = 0):
    """A state dict in the OpenAI CLIP layout (``visual.conv1.weight``, ``visual.transformer.resblocks.*``,
    ``text_projection`` ...) for a tiny ViT (width 64, 2 layers, patch 32, 224 px)."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(embed_dim, CLIPVisionCfg(layers=2, width=64, patch_size=32, image_size=224, head_width=64),
                 CLIPTextCfg(context_length=77, vocab_size=1000, width=64, heads=1, layers=1), quick_gelu=True)
    assert open_clip is not None
    return {k: v for k, v in model.state_dict().items()}


def tiny_qwen2vl_config():
    """A ~200k-parameter Qwen2-VL config (ids of the special tokens below the tiny vocabulary)."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293,
    )


def tiny_qwen2vl_tokenizer(config):
    from raven_video.rewards.text_alignment import REWARD_TOKENS, VIDEOALIGN_PROMPT, build_offline_tokenizer

    specials = {"<|endoftext|>": 280, "<|im_start|>": 281, "<|im_end|>": 282,
                "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id,
                "<|video_pad|>": config.video_token_id, "<|image_pad|>": config.image_token_id}
    for i, t in enumerate(REWARD_TOKENS):
        specials[t] = 294 + i
    words = sorted(set(VIDEOALIGN_PROMPT.split()))[:250]
    return build_offline_tokenizer(specials, words)

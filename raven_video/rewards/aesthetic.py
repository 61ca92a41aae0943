"""Aesthetic quality: OpenAI CLIP ViT-L/14 + LAION linear head, VBench semantics
(docs/rewards_eval.md ``aq_AES``).

Per video ``[F, 3, H, W]`` uint8, all frames:

1. VBench ``clip_transform(224)`` on the uint8 tensor: short side -> 224 (bicubic, ``antialias=False``; torchvision
   re-quantises to uint8), centre crop 224, ``/ 255``, CLIP mean/std,
2. ``encode_image`` (open_clip ``ViT-L-14-quickgelu`` = OpenAI weights; QuickGELU matters: plain ``ViT-L-14`` with
   OpenAI weights silently gives wrong embeddings), cast to fp32, L2-normalise,
3. LAION ``sa_0_4_vit_l_14_linear.pth`` = ``nn.Linear(768, 1)`` (``{weight, bias}``), ``/ 10``,
4. mean over frames -> ``aesthetic`` (about 0.4-0.7 on real videos).

Weights: the OpenAI ``ViT-L-14.pt`` (TorchScript archive, as VBench's cache holds) or a plain OpenAI-layout state
dict, loaded with ``open_clip.load_openai_model`` (architecture inferred from the tensors), and the LAION head.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from ._torchvision_compat import import_torchvision
from .base import VideoReward, resolve_checkpoint, torch_load

__all__ = ["AestheticReward", "CLIP_MEAN", "CLIP_STD", "vbench_clip_transform", "build_laion_linear_head"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vbench_clip_transform(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """VBench ``clip_transform``: uint8 ``[N, 3, H, W]`` -> normalised float ``[N, 3, size, size]``."""
    tv = import_torchvision()
    tf = tv.transforms.functional
    x = tf.resize(frames, size, interpolation=tv.transforms.InterpolationMode.BICUBIC, antialias=False)
    x = tf.center_crop(x, [size, size])
    x = x.float().div(255.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def build_laion_linear_head(checkpoint: Optional[str] = None, embed_dim: int = 768,
                            allow_pickle: bool = False) -> torch.nn.Linear:
    """LAION aesthetic linear head (``sa_0_4_vit_l_14_linear.pth``: ``{'weight': [1, D], 'bias': [1]}``)."""
    if checkpoint is None:
        return torch.nn.Linear(embed_dim, 1)
    sd = torch_load(checkpoint, allow_pickle=allow_pickle)
    if not (isinstance(sd, dict) and "weight" in sd and "bias" in sd):
        raise ValueError(
            f"{checkpoint}: expected the LAION linear head state dict {{'weight', 'bias'}} "
            f"(sa_0_4_vit_l_14_linear.pth), got keys {list(sd)[:5] if isinstance(sd, dict) else type(sd)}. "
            "The MLP head of improved-aesthetic-predictor is a different model."
        )
    head = torch.nn.Linear(sd["weight"].shape[1], 1)
    head.load_state_dict(sd, strict=True)
    return head


def _import_open_clip():
    import_torchvision()
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            "AestheticReward needs open_clip: `pip install --no-deps 'open_clip_torch>=3,<4' 'timm>=1.0.17' ftfy regex` "
            "(see .ci/install_rewards.sh)."
        ) from e
    return open_clip


class AestheticReward(VideoReward):
    """CLIP ViT-L/14 + LAION linear head aesthetic score (field ``aesthetic``).

    Args:
        clip_checkpoint: OpenAI ``ViT-L-14.pt`` (local / folder / ``"owner/repo/file"``).
        head_checkpoint: LAION ``sa_0_4_vit_l_14_linear.pth``.
        random_init: random ``ViT-L-14-quickgelu`` visual tower and head (tests, benchmarks).
        clip_visual, head: already built modules (the visual tower of an open_clip ``CLIP`` and a ``Linear(D, 1)``).
        device, dtype: CLIP runs in ``dtype`` (RAVEN: bf16, VBench on GPU: fp16); the head in fp32.
        allow_pickle: consent to unpickle a checkpoint that ``torch.load(weights_only=True)`` refuses (it runs code
            stored in the file: trusted files only; see :func:`~raven_video.rewards.base.torch_load`).
        frame_batch_size: frames per CLIP forward (VBench: 32).
    """

    name = "aesthetic"
    fields = ("aesthetic",)
    min_frames = 1

    def __init__(
        self,
        clip_checkpoint: Optional[str] = None,
        head_checkpoint: Optional[str] = None,
        *,
        random_init: bool = False,
        clip_visual: Optional[torch.nn.Module] = None,
        head: Optional[torch.nn.Module] = None,
        model_name: str = "ViT-L-14-quickgelu",
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        frame_batch_size: int = 32,
        image_size: int = 224,
    ):
        super().__init__(device, dtype, allow_pickle)
        given = clip_visual is not None and head is not None
        if not random_init and not given and (clip_checkpoint is None or head_checkpoint is None):
            raise ValueError(
                "AestheticReward: pass clip_checkpoint=<OpenAI ViT-L-14.pt> and head_checkpoint="
                "<sa_0_4_vit_l_14_linear.pth> (local paths or 'owner/repo/file'), or random_init=True."
            )
        self.clip_checkpoint, self.head_checkpoint = clip_checkpoint, head_checkpoint
        self.model_name = model_name
        self.random_init = random_init
        self.frame_batch_size = int(frame_batch_size)
        self.image_size = int(image_size)
        self.head = None
        if given:
            self.model = clip_visual.to(self.device, dtype).eval()
            self.head = head.to(self.device, torch.float32).eval()

    def _build(self) -> None:
        open_clip = _import_open_clip()
        if self.clip_checkpoint is not None:
            path = resolve_checkpoint(self.clip_checkpoint, "ViT-L-14.pt", self.name)
            clip = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
        else:
            clip = open_clip.create_model(self.model_name, pretrained=None)
        visual = clip.visual
        embed_dim = getattr(visual, "output_dim", 768)
        head_path = None
        if self.head_checkpoint is not None:
            head_path = str(resolve_checkpoint(self.head_checkpoint, "sa_0_4_vit_l_14_linear.pth", self.name))
        head = build_laion_linear_head(head_path, embed_dim, allow_pickle=self.allow_pickle)
        if head.in_features != embed_dim:
            raise ValueError(f"{self.name}: head expects {head.in_features}-d embeddings but CLIP gives {embed_dim}-d")
        self.model = visual.to(self.device, self.dtype).eval().requires_grad_(False)
        self.head = head.to(self.device, torch.float32).eval().requires_grad_(False)

    def to(self, device):
        super().to(device)
        if self.head is not None:
            self.head.to(self.device)
        return self

    def frame_scores(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> per-frame aesthetic ``[N]`` (already ``/ 10``)."""
        out = []
        for s in range(0, frames.shape[0], self.frame_batch_size):
            x = vbench_clip_transform(frames[s : s + self.frame_batch_size], self.image_size).to(self.dtype)
            feats = F.normalize(self.model(x).float(), dim=-1, p=2)
            out.append(self.head(feats).squeeze(-1) / 10.0)
        return torch.cat(out)

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        b, f = frames.shape[:2]
        per_frame = self.frame_scores(frames.reshape(b * f, *frames.shape[2:])).reshape(b, f)
        return {"aesthetic": per_frame.mean(1)}

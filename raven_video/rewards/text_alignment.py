"""Text alignment: VideoAlign / VideoReward (Qwen2-VL-2B + LoRA + reward head) on transformers (docs/rewards_eval.md
``videoalign_TA``).

Per video ``[F, 3, H, W]`` uint8 at ``fps`` and its prompt:

1. uniform sampling at 2 fps: ``n = round_to_even(clamp(F / fps * 2, 4, floor_even(min(768, F))))`` frames at
   ``linspace(0, F - 1, n).round()`` (81 frames @ 16 fps -> 10 frames),
2. Qwen2-VL ``smart_resize`` (factor 28, min 128*28*28, max 200 704 px per frame; 480x832 -> 336x588), bicubic
   with antialias on the uint8 frames,
3. ``/ 255``, CLIP mean/std, Qwen2-VL patches (temporal 2, spatial 14, merge 2): ``T/2 * H/14 * W/14`` patches of
   ``3*2*14*14`` values and ``T/2 * H/14 * W/14 / 4`` video tokens,
4. the "detailed_special" VideoAlign prompt (three special tokens ``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>``) in
   the Qwen2-VL chat template, a forward of the LoRA-merged Qwen2-VL, and the reward head ``rm_head`` (``Linear(hidden,
   output_dim, bias=False)``) read at the three special tokens,
5. normalisation: VQ ``(x - 3.6757) / 2.2476``, MQ ``(x - 1.1646) / 1.3811``, TA ``(x - 2.8105) / 2.5121``.

Fields: ``text_alignment`` (normalised TA, RAVEN's reward), ``videoalign_vq``, ``videoalign_mq``,
``videoalign_overall`` (VQ + MQ + TA).

Pixels and tokens are built here on tensors (on the reward's device) instead of with ``Qwen2VLProcessor``: its video
path takes PIL/numpy frames on the CPU and imports torchvision at module level; the layout is checked against
transformers' ``Qwen2VLImageProcessor`` in the tests.

Checkpoint (``KwaiVGI/VideoReward``): a folder with ``model_config.json`` and ``checkpoint-<step>/model.pth``, a state
dict of the PEFT-wrapped reward model in transformers-4.4x names (``base_model.model.model.layers.*``,
``base_model.model.visual.*``, ``...lora_A.default.weight``, ``base_model.model.rm_head.weight``). LoRA targets and
rank are read from the checkpoint's own keys, alpha from ``model_config.json`` (default ``2 * r``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._torchvision_compat import import_torchvision
from .base import VideoReward, resolve_checkpoint, torch_load

__all__ = [
    "VideoAlignReward",
    "VIDEOALIGN_PROMPT",
    "VIDEOALIGN_NORM",
    "sample_frame_indices",
    "videoalign_resize",
    "qwen2vl_video_patches",
    "build_offline_tokenizer",
    "qwen2_vl_2b_config",
    "convert_videoalign_state_dict",
]

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
#: (mean, std) per head, VideoAlign's ``inference_config`` (docs/rewards_eval.md).
VIDEOALIGN_NORM = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_FRAME_PIXELS = 200704
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

#: VideoAlign's "detailed_special" template (KwaiVGI/VideoAlign ``prompt_template.py``): the reward model was trained
#: with exactly this text, so it is data, not a choice.
VIDEOALIGN_PROMPT = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible.

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""

#: Qwen2-VL chat template rendered for one user turn [video, text] with ``add_generation_prompt=True``.
CHAT_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
CHAT_SUFFIX = "<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------
def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def sample_frame_indices(num_frames: int, source_fps: float, target_fps: float = 2.0) -> List[int]:
    """VideoAlign / qwen-vl-utils uniform sampling at ``target_fps`` (81 frames @ 16 fps -> 10 indices)."""
    min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(FPS_MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = num_frames / source_fps * target_fps
    n = _round_by(min(max(n, min_frames), max_frames), FRAME_FACTOR)
    n = min(n, num_frames)
    if not FRAME_FACTOR <= n <= num_frames:
        raise ValueError(f"VideoAlign needs at least {FRAME_FACTOR} frames after sampling, got {n} from {num_frames}")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def videoalign_resize(frames: torch.Tensor, max_pixels: int = VIDEO_MAX_FRAME_PIXELS) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> float ``[T, 3, h, w]`` in [0, 255], ``h, w`` multiples of 28 (Qwen2-VL ``smart_resize``),
    bicubic with antialias in uint8 as VideoAlign does."""
    tv = import_torchvision()
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = frames.shape[-2:]
    rh, rw = smart_resize(h, w, factor=28, min_pixels=VIDEO_MIN_PIXELS, max_pixels=max(int(max_pixels), VIDEO_MIN_PIXELS))
    out = tv.transforms.functional.resize(
        frames, [rh, rw], interpolation=tv.transforms.InterpolationMode.BICUBIC, antialias=True
    )
    return out.float()


def qwen2vl_video_patches(
    frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL patch layout. ``frames``: float ``[T, 3, H, W]`` in [0, 255] (``H, W`` multiples of
    ``patch_size * merge_size``) -> (``pixel_values_videos [N, 3 * tps * p * p]``, ``grid_thw [1, 3]``)."""
    x = frames / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[0] % temporal_patch_size:
        pad = temporal_patch_size - x.shape[0] % temporal_patch_size
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = x.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = x.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size,
                  patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return patches, torch.tensor([[gt, gh, gw]], device=frames.device)


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------
def _transformers_qwen2vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return Qwen2VLConfig, Qwen2VLForConditionalGeneration


def qwen2_vl_2b_config(vocab_size: int = 151936):
    """``Qwen/Qwen2-VL-2B-Instruct`` architecture (random-weight benchmarks without its ``config.json``)."""
    Qwen2VLConfig, _ = _transformers_qwen2vl()
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True, sliding_window=32768, max_window_layers=28,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def _reward_model_class():
    _, Qwen2VLForConditionalGeneration = _transformers_qwen2vl()

    class Qwen2VLRewardModel(Qwen2VLForConditionalGeneration):
        """Qwen2-VL with VideoAlign's reward head ``rm_head = Linear(hidden, output_dim, bias=False)``."""

        def __init__(self, config, output_dim: int = 1):
            super().__init__(config)
            self.rm_head = torch.nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
            self.post_init()

        def reward_logits(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw, mm_token_type_ids,
                          special_token_ids: Sequence[int]) -> torch.Tensor:
            """Head outputs at the three special tokens -> ``[B, 3]`` (VQ, MQ, TA), fp32."""
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False,
            ).last_hidden_state
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for tid in special_token_ids:
                mask |= input_ids == tid
            counts = mask.sum(1)
            if not bool((counts == 3).all()):
                raise RuntimeError(f"each sequence must hold the 3 reward tokens once, found {counts.tolist()}")
            logits = self.rm_head(hidden[mask]).float().view(input_ids.shape[0], 3, -1)
            if logits.shape[-1] == 3:
                logits = logits.diagonal(dim1=1, dim2=2)
            elif logits.shape[-1] != 1:
                raise ValueError(f"rm_head output_dim must be 1 or 3, got {logits.shape[-1]}")
            return logits.reshape(input_ids.shape[0], 3)

    return Qwen2VLRewardModel


def __getattr__(name):  # lazy: keeps transformers' import out of `import raven_video.rewards`
    if name == "Qwen2VLRewardModel":
        return _reward_model_class()
    raise AttributeError(name)


def build_offline_tokenizer(special_token_ids: Dict[str, int], vocab_words: Sequence[str] = (), unk_id: int = 0):
    """A word-level ``PreTrainedTokenizerFast`` built in memory (random-weight tests/benchmarks; no vocabulary
    download). ``special_token_ids``: token -> id (Qwen2-VL's chat/vision tokens and the reward tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": unk_id}
    next_id = 0
    used = set(special_token_ids.values()) | {unk_id}
    for word in vocab_words:
        while next_id in used:
            next_id += 1
        if word not in vocab:
            vocab[word] = next_id
            used.add(next_id)
    vocab.update(special_token_ids)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(special_token_ids))
    pad = "<|endoftext|>" if "<|endoftext|>" in special_token_ids else "[UNK]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token=pad)


_OLD_LAYOUT = [("base_model.model.model.", "base_model.model.model.language_model."),
               ("base_model.model.visual.", "base_model.model.model.visual.")]


def convert_videoalign_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers-4.4x VideoReward names -> current transformers names (LM under ``model.language_model``, vision
    tower under ``model.visual``). Already-converted keys are left alone."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("base_model.model.model.") and not k.startswith(
            ("base_model.model.model.language_model.", "base_model.model.model.visual.")
        ):
            k = "base_model.model.model.language_model." + k[len("base_model.model.model."):]
        elif k.startswith("base_model.model.visual."):
            k = "base_model.model.model.visual." + k[len("base_model.model.visual."):]
        out[k] = v
    return out


def _find_model_pth(path: str) -> Tuple[str, Optional[dict]]:
    """Folder with ``model_config.json`` + ``checkpoint-<step>/model.pth`` (latest step) or a ``model.pth`` file."""
    if os.path.isfile(path):
        cfg_file = os.path.join(os.path.dirname(os.path.dirname(path)), "model_config.json")
        cfg = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else None
        return path, cfg
    cfg_file = os.path.join(path, "model_config.json")
    cfg = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else None
    ckpts = glob.glob(os.path.join(path, "checkpoint-*", "model.pth"))
    if not ckpts and os.path.isfile(os.path.join(path, "model.pth")):
        ckpts = [os.path.join(path, "model.pth")]
    if not ckpts:
        raise FileNotFoundError(f"VideoAlign: no checkpoint-<step>/model.pth under {path}")
    ckpts.sort(key=lambda p: int(re.findall(r"checkpoint-(\d+)", p)[-1]) if "checkpoint-" in p else -1)
    return ckpts[-1], cfg


class VideoAlignReward(VideoReward):
    """VideoAlign / VideoReward text-alignment reward.

    Args:
        base_model: ``Qwen/Qwen2-VL-2B-Instruct`` folder (config, tokenizer) or Hub id (explicit download).
        checkpoint: VideoReward folder (``model_config.json`` + ``checkpoint-*/model.pth``) or a ``model.pth``.
        random_init: random weights; uses ``config`` (default: the 2B architecture) and ``tokenizer`` (default: an
            offline word-level tokenizer).
        config, tokenizer: explicit Qwen2VLConfig / tokenizer (tests: tiny config built in the test).
        output_dim: reward head width (1 with special tokens, VideoAlign's default; 3 supported).
        target_fps, max_pixels: sampling (2 fps) and per-frame pixel budget (200 704).
        device, dtype: RAVEN uses bf16; attention is PyTorch SDPA (flash-attn is optional, not required).
        allow_pickle: consent to unpickle a checkpoint that ``torch.load(weights_only=True)`` refuses (it runs code
            stored in the file: trusted files only; see :func:`~raven_video.rewards.base.torch_load`).
        use_norm: apply :data:`VIDEOALIGN_NORM`.
    """

    name = "text_alignment"
    fields = ("text_alignment", "videoalign_vq", "videoalign_mq", "videoalign_overall")
    min_frames = 2
    needs_prompts = True

    def __init__(
        self,
        base_model: Optional[str] = None,
        checkpoint: Optional[str] = None,
        *,
        random_init: bool = False,
        config=None,
        tokenizer=None,
        output_dim: int = 1,
        target_fps: float = 2.0,
        max_pixels: int = VIDEO_MAX_FRAME_PIXELS,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        use_norm: bool = True,
        attn_implementation: str = "sdpa",
    ):
        super().__init__(device, dtype, allow_pickle)
        if not random_init and (base_model is None or checkpoint is None):
            raise ValueError(
                "VideoAlignReward: pass base_model=<Qwen2-VL-2B-Instruct folder> and checkpoint=<VideoReward folder "
                "with checkpoint-*/model.pth>, or random_init=True (optionally with a tiny config=/tokenizer=)."
            )
        self.base_model, self.checkpoint = base_model, checkpoint
        self.random_init = random_init
        self.config, self.tokenizer = config, tokenizer
        self.output_dim = int(output_dim)
        self.target_fps, self.max_pixels = float(target_fps), int(max_pixels)
        self.use_norm = use_norm
        self.attn_implementation = attn_implementation
        self.special_token_ids: List[int] = []

    # -- building ----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        Qwen2VLRewardModel = _reward_model_class()
        Qwen2VLConfig, _ = _transformers_qwen2vl()
        if self.random_init and self.checkpoint is None:
            config = self.config if self.config is not None else qwen2_vl_2b_config()
            tokenizer = self.tokenizer
            if tokenizer is None:
                specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                            "<|vision_start|>": config.vision_start_token_id,
                            "<|vision_end|>": config.vision_end_token_id,
                            "<|video_pad|>": config.video_token_id, "<|image_pad|>": config.image_token_id}
                for i, t in enumerate(REWARD_TOKENS):
                    specials[t] = config.text_config.vocab_size - 3 + i
                words = sorted(set(VIDEOALIGN_PROMPT.split()) | {"system", "user", "assistant", "You", "are", "a",
                                                                  "helpful", "assistant."})
                tokenizer = build_offline_tokenizer(specials, words)
            config._attn_implementation = self.attn_implementation
            model = Qwen2VLRewardModel(config, output_dim=self.output_dim)
        else:
            from transformers import AutoTokenizer

            base = str(resolve_checkpoint(self.base_model, None, self.name))
            config = Qwen2VLConfig.from_pretrained(base)
            tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(base, padding_side="right")
            path, cfg = _find_model_pth(str(resolve_checkpoint(self.checkpoint, None, self.name)))
            sd = convert_videoalign_state_dict(torch_load(path, allow_pickle=self.allow_pickle))
            output_dim = self.output_dim
            head = [k for k in sd if k.endswith("rm_head.weight") or k.endswith("rm_head.base_layer.weight")]
            if head:
                output_dim = sd[head[0]].shape[0]
            config._attn_implementation = self.attn_implementation
            model = Qwen2VLRewardModel(config, output_dim=output_dim)
            model = self._load_peft_state_dict(model, tokenizer, sd, cfg)
        missing = [t for t in REWARD_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        self.special_token_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        if max(self.special_token_ids) >= model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        if tokenizer.pad_token_id is None:
            raise ValueError("VideoAlign tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)

    def _load_peft_state_dict(self, model, tokenizer, sd: Dict[str, torch.Tensor], cfg: Optional[dict]):
        """Add the reward tokens, wrap in PEFT LoRA with the targets found in ``sd``, load ``strict=True``, merge."""
        from peft import LoraConfig, get_peft_model

        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        emb = [k for k in sd if k.endswith("embed_tokens.weight") or k.endswith("embed_tokens.base_layer.weight")]
        model.resize_token_embeddings(sd[emb[0]].shape[0] if emb else len(tokenizer))
        prefix = "base_model.model."
        targets = sorted({k[len(prefix):].split(".lora_A.")[0] for k in sd if ".lora_A." in k})
        to_save = sorted({k[len(prefix):].split(".modules_to_save.")[0] for k in sd if ".modules_to_save." in k})
        if not targets:
            raise ValueError("VideoAlign checkpoint has no LoRA (lora_A) tensors; is this a VideoReward model.pth?")
        rank = next(v.shape[0] for k, v in sd.items() if ".lora_A." in k and k.endswith(".weight"))
        lcfg = (cfg or {}).get("peft_lora_config", {})
        lora = LoraConfig(
            r=int(lcfg.get("lora_r", rank)), lora_alpha=int(lcfg.get("lora_alpha", 2 * rank)), lora_dropout=0.0,
            target_modules=targets, modules_to_save=to_save or None, bias="none",
            use_rslora=bool(lcfg.get("use_rslora", False)),
        )
        peft_model = get_peft_model(model, lora)
        missing, unexpected = peft_model.load_state_dict(sd, strict=False)
        # tied lm_head may be absent from the file; everything else must match exactly
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                f"VideoAlign checkpoint does not match the model: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        return peft_model.merge_and_unload()

    # -- inputs ------------------------------------------------------------------------------------------------
    def build_inputs(self, frames: torch.Tensor, prompts: List[str], fps: float) -> Dict[str, torch.Tensor]:
        """uint8 ``[B, F, 3, H, W]`` + prompts -> model inputs (``input_ids``, ``attention_mask``,
        ``pixel_values_videos``, ``video_grid_thw``, ``mm_token_type_ids``)."""
        cfg = self.model.config
        vis = cfg.vision_config
        idx = sample_frame_indices(frames.shape[1], fps, self.target_fps)
        patches, grids, ids = [], [], []
        for video, prompt in zip(frames, prompts):
            clip = videoalign_resize(video[idx], self.max_pixels)
            p, g = qwen2vl_video_patches(clip, vis.patch_size, vis.temporal_patch_size, vis.spatial_merge_size)
            patches.append(p)
            grids.append(g)
            n_tokens = int(g.prod()) // (vis.spatial_merge_size ** 2)
            pre = self.tokenizer(CHAT_PREFIX, add_special_tokens=False)["input_ids"]
            text = VIDEOALIGN_PROMPT.format(text_prompt=prompt)
            post = self.tokenizer(CHAT_SUFFIX.format(text=text), add_special_tokens=False)["input_ids"]
            ids.append(pre + [cfg.video_token_id] * n_tokens + post)
        length = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            attention[i, : len(x)] = 1
        mm_types = (input_ids == cfg.video_token_id).long() * 2  # 0 text, 1 image, 2 video (transformers >= 5)
        dev = self.device
        return {
            "input_ids": input_ids.to(dev),
            "attention_mask": attention.to(dev),
            "pixel_values_videos": torch.cat(patches).to(dev, self.dtype),
            "video_grid_thw": torch.cat(grids).to(dev),
            "mm_token_type_ids": mm_types.to(dev),
        }

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        inputs = self.build_inputs(frames, prompts, fps)
        raw = self.model.reward_logits(**inputs, special_token_ids=self.special_token_ids)
        vq, mq, ta = raw[:, 0], raw[:, 1], raw[:, 2]
        if self.use_norm:
            vq = (vq - VIDEOALIGN_NORM["VQ"][0]) / VIDEOALIGN_NORM["VQ"][1]
            mq = (mq - VIDEOALIGN_NORM["MQ"][0]) / VIDEOALIGN_NORM["MQ"][1]
            ta = (ta - VIDEOALIGN_NORM["TA"][0]) / VIDEOALIGN_NORM["TA"][1]
        return {"text_alignment": ta, "videoalign_vq": vq, "videoalign_mq": mq, "videoalign_overall": vq + mq + ta}

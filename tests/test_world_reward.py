"""The world score as a CM-GRPO reward (``--reward_weights world=1``)."""

import numpy as np
import pytest
import torch

from raven_video.rewards.composer import RewardComposer, build_reward, parse_reward_weights
from raven_video.world import render_clip


def _videos(clips):
    return torch.from_numpy(np.stack([clip.frames for clip in clips])).permute(0, 1, 4, 2, 3)  # uint8 [B, F, 3, H, W]


def test_world_reward_is_one_on_rendered_clips_and_low_on_noise():
    clips = [render_clip(seed, num_frames=33) for seed in (1, 2)]
    reward = build_reward("world")
    truth = reward(_videos(clips), prompts=[c.prompt for c in clips])["world"]
    noise = torch.randint(0, 256, (2, 33, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    scored = reward(noise, prompts=[c.prompt for c in clips])["world"]
    assert torch.allclose(truth, torch.ones(2))
    assert (scored < 0.5).all()
    swapped = reward(_videos(clips), prompts=[clips[1].prompt, clips[0].prompt])["world"]
    assert (swapped < truth).all()  # the score follows the prompt, not just the look of the video


def test_world_reward_through_the_composer_and_its_errors():
    assert parse_reward_weights("world=1") == {"world": 1.0}
    composer = RewardComposer.from_string("world=1", aggregation="weighted_sum", build_missing=True)
    clips = [render_clip(3, num_frames=17)]
    out = composer(_videos(clips), prompts=[clips[0].prompt])
    assert out["world"].shape == (1,) and float(out["total"][0]) == pytest.approx(float(out["world"][0]))
    with pytest.raises(ValueError, match="not a world caption"):
        build_reward("world")(_videos(clips), prompts=["a cat playing the piano"])
    with pytest.raises(ValueError, match="prompts"):
        build_reward("world")(_videos(clips))


def test_world_reward_in_worker_processes_equals_the_serial_score():
    """``workers > 1`` scores a batch in a process pool (CM-GRPO's reward on a many-core GPU host): same numbers,
    same early error for a prompt outside the grammar (raised here, before any work is sent out)."""
    from raven_video.rewards.world import WorldReward

    clips = [render_clip(seed, num_frames=17) for seed in (4, 5, 6)]
    prompts = [clips[1].prompt, clips[0].prompt, clips[2].prompt]  # one video scored against the wrong prompt too
    serial = WorldReward(workers=1)(_videos(clips), prompts=prompts)["world"]
    pooled = WorldReward(workers=2)
    try:
        assert torch.equal(pooled(_videos(clips), prompts=prompts)["world"], serial)
        assert pooled._pool is not None
        with pytest.raises(ValueError, match="not a world caption"):
            pooled(_videos(clips), prompts=[*prompts[:2], "a cat playing the piano"])
    finally:
        pooled.close()
    with pytest.raises(ValueError, match="workers=0"):
        WorldReward(workers=0)

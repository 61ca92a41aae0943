"""The procedural video world: scenes, captions, rendering, ground truth and data helpers (CPU, no network)."""

import itertools
import math

import numpy as np
import pytest
import torch

from raven_video.world import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SEED_OFFSET,
    HELDOUT_SHAPE_MOTION,
    VOCABULARY,
    WALL_BITS,
    ObjectInit,
    ObjectSpec,
    ParsedCaption,
    SceneInit,
    SceneSpec,
    caption,
    count_bounces,
    initial_state,
    is_heldout_object,
    parse_caption,
    prompt_for_seed,
    render,
    render_clip,
    sample_scene,
    tokenize,
)
from raven_video.world.scene import LINEAR_MOTIONS, LINEAR_SPEED

SEEDS = range(300)


def _scenes(split):
    for seed in SEEDS:
        scene = sample_scene(seed, split=split)
        yield seed, scene, initial_state(seed, scene)


# ----------------------------------------------------------------------------------------- scenes and captions


def test_palette_is_well_separated():
    colours = np.array(list(COLOURS.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=float)
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert len(COLOURS) >= 6 and len(BACKGROUNDS) >= 3
    assert pairwise[~np.eye(len(colours), dtype=bool)].min() >= 100
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=-1).min() >= 140


def test_same_seed_same_bytes_and_different_seeds_differ():
    first, again, other = render_clip(7, num_frames=33), render_clip(7, num_frames=33), render_clip(8, num_frames=33)
    assert first.frames.tobytes() == again.frames.tobytes() and first.prompt == again.prompt
    assert first.frames.tobytes() != other.frames.tobytes()
    assert first.frames.dtype == np.uint8 and first.frames.shape == (33, 64, 64, 3)
    assert prompt_for_seed(7) == first.prompt


def test_caption_round_trip_and_vocabulary_is_exactly_reachable():
    seen = set()
    for split in ("train", "heldout"):
        for seed, scene, init in _scenes(split):
            bounces = count_bounces(scene, init, 81)
            text = caption(scene, bounces)
            assert text == text.lower()
            assert parse_caption(text) == ParsedCaption(scene, tuple(min(b, 2) for b in bounces))
            seen |= set(tokenize(text))
    assert seen == set(VOCABULARY) and VOCABULARY == sorted(VOCABULARY)


def test_caption_grammar_example():
    scene = SceneSpec((ObjectSpec("circle", "red", "right", "quickly"), ObjectSpec("square", "blue", "still", None)),
                      "gray")
    text = ("a red circle moves right quickly and bounces off the wall while a blue square stays still, "
            "on a gray background")
    assert caption(scene, (1, 0)) == text
    assert parse_caption(text.upper()) == ParsedCaption(scene, (1, 0))
    three = SceneSpec((ObjectSpec("triangle", "orange", "up_left", "slowly"),
                       ObjectSpec("circle", "cyan", "orbits", "slowly"),
                       ObjectSpec("square", "yellow", "grows", "quickly")), "black")
    assert caption(three, (3, 0, 0)) == (
        "an orange triangle moves up and to the left slowly and bounces off the walls, a cyan circle circles around "
        "the center slowly, and a yellow square grows quickly, on a black background")


@pytest.mark.parametrize("text, fragment", [
    ("a red hexagon stays still, on a gray background", "'hexagon'"),
    ("a red circle stays still on a gray background", "expected ','"),
    ("a red circle stays still, on a gray background background", "continues after"),
    ("a red circle stays still while a red square stays still, on a gray background", "repeats a colour"),
    ("a red circle moves right, on a gray background", "'slowly' or 'quickly'"),
    ("", "expected 'a' or 'an'"),
])
def test_parse_caption_rejects_with_a_clear_message(text, fragment):
    with pytest.raises(ValueError, match="caption|colour") as err:
        parse_caption(text)
    assert fragment in str(err.value)


def test_heldout_pairs_never_in_train_and_in_every_heldout_scene():
    for _, scene, _ in _scenes("train"):
        assert not any(is_heldout_object(obj) for obj in scene.objects)
    used = set()
    for _, scene, _ in _scenes("heldout"):
        assert any(is_heldout_object(obj) for obj in scene.objects)
        used |= {(o.colour, o.shape) for o in scene.objects} | {(o.shape, o.motion) for o in scene.objects}
    assert set(HELDOUT_COLOUR_SHAPE) | set(HELDOUT_SHAPE_MOTION) <= used


def test_invalid_arguments_name_the_value():
    with pytest.raises(ValueError, match="height=40"):
        render_clip(0, height=40)
    with pytest.raises(ValueError, match="split 'test'"):
        sample_scene(0, split="test")
    with pytest.raises(ValueError, match="seed=-1"):
        sample_scene(-1)
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ObjectSpec("circle", "pink", "still", None)
    with pytest.raises(ValueError, match="bounce count 1"):
        caption(SceneSpec((ObjectSpec("circle", "red", "still", None),), "gray"), (1,))


# ------------------------------------------------------------------------------------------------ rendering


def test_objects_stay_on_screen_and_bounce_at_walls_with_a_flipped_velocity():
    checked = 0
    for seed in range(40):
        for height, width in ((64, 64), (48, 80)):
            scene = sample_scene(seed)
            init = initial_state(seed, scene, height, width)
            tracks = render(scene, init, 321, supersample=1)[1]
            scale = min(height, width) / 64
            for obj, track in zip(scene.objects, tracks):
                half = track.size / 2
                assert (track.x - half >= -1e-9).all() and (track.x + half <= width + 1e-9).all()
                assert (track.y - half >= -1e-9).all() and (track.y + half <= height + 1e-9).all()
                if obj.motion not in LINEAR_MOTIONS:
                    assert not track.bounce.any()
                    continue
                step = LINEAR_SPEED[obj.speed] * scale
                for t in np.flatnonzero(track.bounce):
                    for wall, bit in WALL_BITS.items():
                        if track.bounce[t] & bit:
                            axis = track.x if wall in ("left", "right") else track.y
                            velocity = track.vx if wall in ("left", "right") else track.vy
                            edge = {"left": 0, "top": 0, "right": width, "bottom": height}[wall]
                            assert abs(abs(axis[t] - edge) - half[t]) <= step + 1e-6  # within one step of the wall
                            assert velocity[t] * velocity[t - 1] < 0
                            checked += 1
    assert checked > 100


def test_caption_bounce_clause_matches_the_track():
    walls = 0
    for seed, scene, init in itertools.islice(_scenes("train"), 150):
        clip_tracks = render(scene, init, 81, supersample=1)[1]
        for count, track in zip(count_bounces(scene, init, 81), clip_tracks):
            assert count == sum(int(mask).bit_count() for mask in track.bounce)
            walls += count >= 2
    assert walls > 0


def test_occlusion_visible_fraction_and_antialiasing():
    red, blue = ObjectSpec("square", "red", "still", None), ObjectSpec("square", "blue", "still", None)
    scene = SceneSpec((red, blue), "black")
    for offset, expected in ((0.0, 0.0), (6.0, 0.5), (12.0, 1.0)):
        init = SceneInit((ObjectInit(20.0, 30.0, 12.0), ObjectInit(20.0 + offset, 30.0, 12.0)), 64, 64)
        frames, tracks = render(scene, init, 2)
        assert tracks[0].visible[0] == pytest.approx(expected, abs=1e-6) and tracks[1].visible[0] == 1.0
    circle = SceneSpec((ObjectSpec("circle", "red", "still", None),), "black")
    frames, _ = render(circle, SceneInit((ObjectInit(31.3, 30.7, 14.0),), 64, 64), 1)
    coverage = frames[0, ..., 0] / COLOURS["red"][0]
    assert coverage.sum() == pytest.approx(math.pi * 49, rel=0.01)
    assert ((coverage > 0.05) & (coverage < 0.95)).sum() > 20  # smooth, anti-aliased edges


def test_any_length_and_size_and_the_grows_motion():
    clip = render_clip(3, num_frames=1, height=48, width=80)
    assert clip.frames.shape == (1, 48, 80, 3) and all(t.x.shape == (1,) for t in clip.tracks)
    scene = SceneSpec((ObjectSpec("circle", "red", "grows", "quickly"),), "white")
    tracks = render(scene, initial_state(0, scene), 400, supersample=1)[1]
    size = tracks[0].size
    assert size[80] / size[0] == pytest.approx(1 + 8 / size[0]) and (np.diff(size[:321]) > 0).all()
    assert (size[320:] == size[320]).all()


# ------------------------------------------------------------------------------------------------ data helpers


def test_prompt_dataset_clip_dataset_and_prompt_file(tmp_path):
    from raven_video.data.prompts import load_prompts
    from raven_video.world import WorldClipDataset, prompt_dataset, tensor_to_frames, world_seeds, write_prompt_file

    rows = prompt_dataset(4, split="heldout", evaluation=True)
    assert rows.column_names == ["seed", "prompt", "split"]
    assert rows["seed"] == [HELDOUT_SEED_OFFSET + i for i in range(4)] and rows["split"] == ["heldout"] * 4
    assert rows["prompt"] == [render_clip(s, split="heldout", num_frames=1).prompt for s in rows["seed"]]

    dataset = WorldClipDataset(3, num_frames=9, height=32, width=32)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["video"].shape == (3, 3, 9, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    clip = render_clip(1, num_frames=9, height=32, width=32)
    assert batch["prompt"][1] == clip.prompt and np.array_equal(tensor_to_frames(batch["video"][1]), clip.frames)

    path = tmp_path / "world_prompts.txt"
    prompts = write_prompt_file(str(path), 5)
    assert len(prompts) == 5 and load_prompts(str(path)) == prompts
    with pytest.raises(ValueError, match="below 1000000000"):
        world_seeds(10, start=HELDOUT_SEED_OFFSET - 5)

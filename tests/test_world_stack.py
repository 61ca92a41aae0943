"""The world's small model stack: tokenizer, frozen text encoder, pipeline assembly."""

import torch

from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.testing import tiny_causal_transformer, tiny_vae
from raven_video.world.captions import VOCABULARY, caption
from raven_video.world.scene import BACKGROUNDS, COLOURS, SHAPES, sample_scene
from raven_video.world.stack import MAX_SEQUENCE_LENGTH, TEXT_DIM, world_pipeline, world_text_encoder, world_tokenizer


def _embed(texts, encoder=None):
    tokenizer, encoder = world_tokenizer(), encoder or world_text_encoder()
    ids = tokenizer(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    return hidden, ids.attention_mask[..., None].float()


def _ridge_accuracy(features, labels, classes, train):
    """Accuracy on the held-out rows of a ridge-regression one-vs-all probe fitted on the first ``train`` rows."""
    design = torch.cat([features, torch.ones(len(features), 1)], 1).double()
    targets = torch.nn.functional.one_hot(labels, classes).double()
    a, y = design[:train], targets[:train]
    weights = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    return float(((design[train:] @ weights).argmax(1) == labels[train:]).double().mean())


def test_tokenizer_covers_the_vocabulary_and_marks_unknown_words():
    tokenizer = world_tokenizer()
    ids = tokenizer(" ".join(VOCABULARY)).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) == len(VOCABULARY) + 1
    assert tokenizer("a red zebra").input_ids[2] == tokenizer.unk_token_id
    assert tokenizer("A RED circle").input_ids == tokenizer("a red circle").input_ids  # normalised to lower case


def test_frozen_text_encoder_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = world_text_encoder(), world_text_encoder()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(p.requires_grad for p in a.parameters()) and a.config.d_model == TEXT_DIM


def test_a_linear_probe_on_the_frozen_embeddings_reads_the_caption():
    """Why a frozen random encoder suffices: each object's colour and the background are linearly decodable."""
    scenes = [sample_scene(seed) for seed in range(1200)]
    hidden, mask = _embed([caption(scene) for scene in scenes])
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    first_colour = torch.tensor([colours.index(s.objects[0].colour) for s in scenes])
    assert _ridge_accuracy(hidden[:, 1], first_colour, len(colours), 1000) >= 0.95  # "a <colour> <shape> ..."
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    background = torch.tensor([backgrounds.index(s.background) for s in scenes])
    assert _ridge_accuracy(pooled, background, len(backgrounds), 1000) >= 0.95


def _shape_tokens(encoder, scenes):
    """The output vector of every shape word of the multi-object captions, with that object's colour and motion."""
    tokenizer = world_tokenizer()
    texts = [caption(scene) for scene in scenes]
    hidden, _ = _embed(texts, encoder)
    vectors, colours, motions = [], [], []
    for scene, text, h in zip(scenes, texts, hidden):
        words = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
        for obj, position in zip(scene.objects, [i for i, w in enumerate(words) if w in SHAPES]):
            vectors.append(h[position])
            colours.append(list(COLOURS).index(obj.colour))
            motions.append(obj.motion)
    kinds = sorted(set(motions))
    return torch.stack(vectors), torch.tensor(colours), torch.tensor([kinds.index(m) for m in motions]), len(kinds)


def test_the_locality_prior_binds_each_shape_word_to_its_objects_colour_and_motion():
    """Wan's cross-attention sees the caption as a set of vectors (no text positions): each object's colour and
    motion must be readable from its shape word's vector alone. With UMT5's random position biases they barely are
    (a bag of words: the first world teachers could not learn which object is the circle); with ``BINDING_HEADS``
    a linear probe reads both, on multi-object captions."""
    scenes = [scene for scene in (sample_scene(seed) for seed in range(1200)) if len(scene.objects) > 1]
    results = {}
    for name, encoder in (("prior", world_text_encoder()), ("random", world_text_encoder(binding=None))):
        vectors, colours, motions, kinds = _shape_tokens(encoder, scenes)
        train = int(0.8 * len(vectors))
        results[name] = (_ridge_accuracy(vectors, colours, len(COLOURS), train),
                         _ridge_accuracy(vectors, motions, kinds, train))
    assert min(results["prior"]) >= 0.95, results
    assert max(results["random"]) <= 0.75, results


def test_world_pipeline_round_trips_with_its_native_size_and_text_length(tmp_path):
    pipe = world_pipeline(tiny_vae(), tiny_causal_transformer(text_dim=TEXT_DIM))
    pipe.save_pretrained(tmp_path)
    loaded = CausalWanPipeline.from_pretrained(tmp_path)
    assert (loaded.config.height, loaded.config.width, loaded.config.fps) == (64, 64, 16)
    assert loaded.config.max_sequence_length == MAX_SEQUENCE_LENGTH
    text, _ = loaded.encode_prompt("a red circle moves right quickly, on a black background",
                                   do_classifier_free_guidance=False,
                                   max_sequence_length=loaded.config.max_sequence_length)
    assert text.shape == (1, MAX_SEQUENCE_LENGTH, TEXT_DIM)


def test_word_swap_gaps_measure_which_words_a_model_reads():
    """``evaluate.word_swap_gaps``: a transformer whose cross-attention output is zeroed reads no word (every gap is
    exactly 0); the random one reads all of them a little."""
    from raven_video.world import evaluate as ev

    assert ev.swap_words("a red circle moves up and to the left, on a white background", "shape") == \
        "a red square moves up and to the left, on a white background"
    assert ev.swap_words("a blue triangle moves right, on a black background", "direction") == \
        "a blue triangle moves up, on a black background"
    torch.manual_seed(0)
    pipe = world_pipeline(tiny_vae(), tiny_causal_transformer(text_dim=TEXT_DIM))
    evalset = ev.heldout_set(2)
    gaps = ev.word_swap_gaps(pipe, evalset, sigmas=(0.5, 0.9))
    assert set(ev.WORD_KINDS) | {"empty"} <= set(gaps) and all(abs(gaps[k]) > 0 for k in ev.WORD_KINDS)
    for block in pipe.transformer.blocks:
        torch.nn.init.zeros_(block.attn2.to_out[0].weight)
        torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    deaf = ev.word_swap_gaps(pipe, evalset, sigmas=(0.5, 0.9))
    assert all(value == 0.0 for value in deaf.values()), deaf


def test_student_videos_with_the_students_own_guidance():
    """``evaluate.student_videos(guidance_scale=...)`` (``evaluate_world.py --student_guidance``): 1 is the plain
    student; > 1 adds the empty-prompt branch and changes the video, same noise, same shape."""
    from raven_video.world import evaluate as ev

    pipe = world_pipeline(tiny_vae(), tiny_causal_transformer(text_dim=TEXT_DIM))
    pipe.set_progress_bar_config(disable=True)
    evalset = ev.heldout_set(2)
    plain = ev.student_videos(pipe, evalset, num_frames=9)
    assert all((a == b).all() for a, b in zip(plain, ev.student_videos(pipe, evalset, num_frames=9, guidance_scale=1.0)))
    guided = ev.student_videos(pipe, evalset, num_frames=9, guidance_scale=3.0)
    assert [v.shape for v in guided] == [v.shape for v in plain]
    assert any((a != b).any() for a, b in zip(plain, guided))

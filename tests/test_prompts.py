"""Prompt sources and the sharded, resumable prompt stream (docs/method.md §5, Alg. 2 l.1-13). No network."""

import json

import pytest
import torch

from raven_video.data.prompts import PromptStream, load_prompts

PROMPTS = ["a red fox running through snow", "waves crashing on rocks", "a city street at night, rain"]


# ------------------------------------------------------------------------------------------ load_prompts


def test_txt_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join([PROMPTS[0], "", "   ", PROMPTS[1] + "  ", PROMPTS[2], ""]) + "\n", encoding="utf-8")
    assert load_prompts(str(path)) == PROMPTS


def test_tabular_files(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"prompt": PROMPTS + [""], "caption": ["x", "y", "z", "w"]})
    df.to_csv(tmp_path / "p.csv", index=False)
    df.to_csv(tmp_path / "p.tsv", index=False, sep="\t")
    df.to_parquet(tmp_path / "p.parquet")
    with open(tmp_path / "p.jsonl", "w") as fh:
        for p in PROMPTS:
            fh.write(json.dumps({"prompt": p, "id": 1}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": p} for p in PROMPTS]))
    for name in ("p.csv", "p.tsv", "p.parquet", "p.jsonl", "p.json"):
        assert load_prompts(str(tmp_path / name)) == PROMPTS, name
    assert load_prompts(str(tmp_path / "p.parquet"), column="caption") == ["x", "y", "z", "w"]


def test_missing_column_lists_columns(tmp_path):
    (tmp_path / "p.csv").write_text("text,other\nhello,1\n")
    with pytest.raises(ValueError) as err:
        load_prompts(str(tmp_path / "p.csv"))
    msg = str(err.value)
    assert "'prompt'" in msg and "['text', 'other']" in msg and "--prompt_column" in msg
    assert load_prompts(str(tmp_path / "p.csv"), column="text") == ["hello"]


def test_saved_datasets_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    ds.save_to_disk(str(tmp_path / "single"))
    assert load_prompts(str(tmp_path / "single")) == PROMPTS
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert load_prompts(str(tmp_path / "dict")) == PROMPTS
    assert load_prompts(str(tmp_path / "dict"), split="validation") == PROMPTS[:1]
    with pytest.raises(ValueError, match="no split 'test'"):
        load_prompts(str(tmp_path / "dict"), split="test")


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError):
        load_prompts("./prompts/missing.csv")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        load_prompts(str(tmp_path / "p.xlsx"))
    with pytest.raises(ValueError, match="non-empty string"):
        load_prompts("  ")


def test_empty_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    (tmp_path / "blank.csv").write_text("prompt\n\"\"\n\" \"\n")
    for name in ("empty.txt", "blank.txt", "blank.csv"):
        with pytest.raises(ValueError, match="no non-blank prompt|no prompt") as err:
            load_prompts(str(tmp_path / name))
        assert name in str(err.value)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as err:
        load_prompts("raven-video-tests/no-such-dataset")
    msg = str(err.value)
    assert "raven-video-tests/no-such-dataset" in msg and "HF_HUB_OFFLINE" in msg


# ------------------------------------------------------------------------------------------ PromptStream

ITEMS = [f"prompt {i}" for i in range(23)]


def _epoch(stream):
    return stream.take(stream.per_epoch)


def test_stream_deterministic_and_reshuffles():
    a = PromptStream(ITEMS, seed=3)
    b = PromptStream(ITEMS, seed=3)
    first = a.take(60)
    assert first == b.take(60)
    assert sorted(first[:23]) == sorted(ITEMS)  # world 1: every prompt once per epoch
    assert first[:23] != first[23:46]  # new shuffle per epoch
    assert PromptStream(ITEMS, seed=4).take(23) != first[:23]


def test_stream_groups_disjoint_and_synced():
    world, sync = 6, 2  # 3 sync groups: ranks {0,1}, {2,3}, {4,5}
    streams = [PromptStream(ITEMS, seed=0, rank=r, world_size=world, sync_group_size=sync) for r in range(world)]
    assert all(s.per_epoch == 23 // 3 for s in streams)
    for _ in range(3):  # several epochs
        epochs = [_epoch(s) for s in streams]
        assert epochs[0] == epochs[1] and epochs[2] == epochs[3] and epochs[4] == epochs[5]
        groups = [set(epochs[0]), set(epochs[2]), set(epochs[4])]
        assert all(len(g) == 7 for g in groups)
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    # sync group of 1: every rank disjoint
    solo = [PromptStream(ITEMS, seed=0, rank=r, world_size=2) for r in range(2)]
    assert not set(_epoch(solo[0])) & set(_epoch(solo[1]))


def test_stream_resume_equals_uninterrupted(tmp_path):
    straight = PromptStream(ITEMS, seed=7, rank=1, world_size=4, sync_group_size=2)
    expected = straight.take(40)
    first = PromptStream(ITEMS, seed=7, rank=1, world_size=4, sync_group_size=2)
    head = first.take(17)
    torch.save(first.state_dict(), tmp_path / "stream.pt")
    # state is rank-independent: rank 0 of the same group (or any rank) can save it for everyone
    resumed = PromptStream(ITEMS, seed=7, rank=1, world_size=4, sync_group_size=2)
    resumed.load_state_dict(torch.load(tmp_path / "stream.pt", weights_only=True))
    assert head + resumed.take(23) == expected
    with pytest.raises(ValueError, match="same --seed"):
        PromptStream(ITEMS, seed=8).load_state_dict(first.state_dict())


def test_stream_validation():
    with pytest.raises(ValueError, match="divide world_size"):
        PromptStream(ITEMS, world_size=4, rank=0, sync_group_size=3)
    with pytest.raises(ValueError, match="rank"):
        PromptStream(ITEMS, world_size=2, rank=2)
    with pytest.raises(ValueError, match="cannot feed"):
        PromptStream(ITEMS[:2], world_size=3, rank=0)
    assert iter(PromptStream(ITEMS)) is not None

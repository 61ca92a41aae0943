"""Prompt sources and the deterministic, sharded prompt stream of RAVEN / CM-GRPO training.

References: docs/method.md §5 (RAVEN: prompts-only training, a seed-shuffled list, each rank its own prompt),
Alg. 2 l.1-13 (CM-GRPO: ``sync_group_size`` consecutive ranks share one prompt stream so a group spans GPUs).
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence

import torch


__all__ = ["load_prompts", "PromptStream"]

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_FORMS = (
    "a .txt file (one prompt per line), a .csv/.tsv/.parquet/.jsonl/.json file with a prompt column, a folder "
    "written by `datasets.Dataset.save_to_disk`, or a Hub dataset id such as 'user/name'"
)


def _looks_like_path(source: str) -> bool:
    return (
        os.path.splitext(source)[1].lower() in set(_BUILDERS) | {".txt"}
        or source.startswith((".", "/", "~"))
        or os.sep in source.rstrip(os.sep) and source.count("/") != 1
    )


def _column(dataset, column: str, source: str) -> List:
    names = list(dataset.column_names)
    if column not in names:
        raise ValueError(
            f"prompt source {source!r} has no column {column!r}; columns found: {names}. "
            f"Pass the right one with --prompt_column."
        )
    return dataset[column]


def _select_split(dataset, split: str, source: str):
    """A ``Dataset`` from a ``Dataset`` or a ``DatasetDict``."""
    if hasattr(dataset, "column_names") and not isinstance(dataset.column_names, dict):
        return dataset
    if split not in dataset:
        raise ValueError(f"prompt source {source!r} has no split {split!r}; splits found: {list(dataset)}.")
    return dataset[split]


def load_prompts(source: str, column: str = "prompt", split: str = "train") -> List[str]:
    """Load a list of prompts (stripped, blank ones dropped, order kept).

    Args:
        source: a ``.txt`` file (one prompt per line); a ``.csv``/``.tsv``/``.parquet``/``.jsonl``/``.json``
            file read with ``datasets.load_dataset`` and the matching builder; a local folder written by
            ``datasets.save_to_disk`` (or any folder ``load_dataset`` understands); or a Hub dataset id.
        column: column holding the prompts (not used for ``.txt``).
        split: split to read (files loaded by a builder always have ``train``).
    Returns:
        ``list[str]``, non-empty.
    Raises:
        FileNotFoundError: a path that does not exist. ValueError: an unsupported file type, a missing column
        or split, no non-blank prompt, or a Hub dataset that cannot be loaded (offline, wrong id).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"prompt source must be a non-empty string, got {source!r}. Accepted: {_FORMS}.")
    source = source.strip()
    path = os.path.expanduser(source)
    ext = os.path.splitext(path)[1].lower()

    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise ValueError(f"prompt source {source!r} is an empty file: it contains no prompt. Add prompts.")
        if ext == ".txt":
            with open(path, encoding="utf-8") as fh:
                values = fh.read().splitlines()
        elif ext in _BUILDERS:
            import datasets

            kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
            dataset = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train", **kwargs)
            values = _column(dataset, column, source)
        else:
            raise ValueError(f"unsupported prompt file type {ext or '(none)'!r} for {source!r}. Accepted: {_FORMS}.")
    elif os.path.isdir(path):
        import datasets

        saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
        dataset = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
        values = _column(_select_split(dataset, split, source), column, source)
    elif _looks_like_path(source):
        raise FileNotFoundError(
            f"prompt source {source!r} does not exist. Pass an existing file or folder, or a Hub dataset id. "
            f"Accepted: {_FORMS}."
        )
    else:
        import datasets

        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as err:  # offline, unknown id, gated: all surface as one clear error
            raise ValueError(
                f"could not load the Hub dataset {source!r} (split {split!r}): {type(err).__name__}: {err}. "
                "Check the id and your network / HF_HUB_OFFLINE setting, or pass a local file instead."
            ) from err
        values = _column(dataset, column, source)

    prompts = [str(v).strip() for v in values if v is not None and str(v).strip()]
    if not prompts:
        raise ValueError(f"prompt source {source!r} contains no non-blank prompt. Add prompts or pick another source.")
    return prompts


class PromptStream:
    """Deterministic infinite prompt iterator, sharded across processes (docs/method.md §5, Alg. 2 l.1-13).

    Ranks are split into ``world_size // sync_group_size`` sync groups of consecutive ranks
    (group ``g`` = ranks ``g * sync_group_size ... (g + 1) * sync_group_size - 1``). Every epoch the prompt
    list is shuffled with a generator seeded by ``(seed, epoch)``; the first
    ``num_groups * (len(prompts) // num_groups)`` shuffled prompts are dealt round-robin to the groups
    (the remainder is dropped for that epoch), so within an epoch different groups get disjoint prompts, all
    ranks of a group get the same ones, and all groups advance in lockstep.

    The state (epoch, position) is identical on every rank, so a state dict saved by the main process only
    (Accelerate's ``register_for_checkpointing``) restores every rank exactly.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sync_group_size: int = 1,
    ):
        prompts = list(prompts)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        if sync_group_size < 1 or world_size % sync_group_size != 0:
            raise ValueError(
                f"sync_group_size={sync_group_size} must be >= 1 and divide world_size={world_size} "
                "(a sync group of consecutive ranks shares one prompt stream, Alg. 2 l.1-13)."
            )
        self.num_groups = world_size // sync_group_size
        if len(prompts) < self.num_groups:
            raise ValueError(
                f"{len(prompts)} prompt(s) cannot feed {self.num_groups} sync groups disjointly; add prompts or "
                "raise sync_group_size."
            )
        self.prompts = prompts
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.sync_group_size = sync_group_size
        self.group = rank // sync_group_size
        self.per_epoch = len(prompts) // self.num_groups
        self.epoch = 0
        self.position = 0
        self._shard: Optional[List[int]] = None

    def epoch_indices(self, epoch: int) -> List[int]:
        """Indices into ``prompts`` that this rank's group receives in ``epoch`` (in order)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.prompts), generator=generator)[: self.per_epoch * self.num_groups]
        return order[self.group :: self.num_groups].tolist()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._shard is None:
            self._shard = self.epoch_indices(self.epoch)
        prompt = self.prompts[self._shard[self.position]]
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position, self._shard = self.epoch + 1, 0, None
        return prompt

    def take(self, n: int) -> List[str]:
        """The next ``n`` prompts."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["seed"] != self.seed or state_dict["num_prompts"] != len(self.prompts):
            raise ValueError(
                f"PromptStream checkpoint was made with seed={state_dict['seed']} and "
                f"{state_dict['num_prompts']} prompts, but this run has seed={self.seed} and "
                f"{len(self.prompts)} prompts; resume with the same --seed and prompt source."
            )
        if not 0 <= int(state_dict["position"]) < self.per_epoch:
            raise ValueError(
                f"PromptStream checkpoint position {state_dict['position']} does not fit {self.per_epoch} prompts per "
                "epoch: resume with the same world size and sync_group_size as the saved run."
            )
        self.epoch, self.position, self._shard = int(state_dict["epoch"]), int(state_dict["position"]), None

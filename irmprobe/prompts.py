"""Prompts: the shipped openings, a file or a dataset column, and the train/held-out split."""

from __future__ import annotations

import logging
import random
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)


def load_prompts(path: str | Path | None = None, *, dataset: str | None = None, column: str = "text",
                 split: str = "train", limit: int | None = None) -> list[str]:
    """Prompts: the shipped file (default), a text file (one per line) or an HF dataset column.

    Args:
        path: a text file with one prompt per non-empty line.
        dataset: an HF dataset name (needs the hub) or a local data file (csv/json/jsonl/parquet).
        column: the dataset column holding the prompts.
        split: the dataset split.
        limit: keep at most this many prompts.
    """
    if path is not None and dataset is not None:
        raise ValueError("give prompts either as a file (path) or as a dataset, not both")
    if dataset is not None:
        prompts = _dataset_column(dataset, column, split)
    elif path is None:
        text = resources.files("irmprobe").joinpath("data/prompts.txt").read_text("utf-8")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        prompts = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts found in {dataset or path}")
    return prompts[:limit] if limit else prompts


def _dataset_column(dataset: str, column: str, split: str) -> list[str]:
    from datasets import load_dataset

    local = Path(dataset)
    try:
        if local.is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(local.suffix)
            if kind is None:
                raise ValueError(f"prompt dataset file {dataset} must be .csv, .json, .jsonl or .parquet")
            data = load_dataset(kind, data_files=str(local), split="train")
        else:
            data = load_dataset(dataset, split=split)
    except (OSError, ConnectionError) as exc:
        raise ValueError(f"could not load dataset {dataset!r} ({exc.__class__.__name__}): the hub is "
                         "unreachable; save the column to a local .csv/.jsonl and pass that file") from exc
    if column not in data.column_names:
        raise ValueError(f"dataset {dataset!r} has no column {column!r}; columns: {data.column_names}")
    return [str(t).strip() for t in data[column] if str(t).strip()]


def split_prompts(prompts: list[str], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and split into (train, held-out)."""
    if not 0 < n_heldout < len(prompts):
        raise ValueError(
            f"n_heldout={n_heldout} must be between 1 and the number of prompts minus one "
            f"({len(prompts) - 1}); supply more prompts or hold out fewer"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in order[n_heldout:]], [prompts[i] for i in order[:n_heldout]]


def chat_template_used(setting, tokenizer) -> bool:
    """Resolve ``pair.chat_template`` for ``tokenizer``: ``auto`` uses the template when the tokenizer has one.

    Raises:
        ValueError: ``true`` and the tokenizer has no chat template.
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has
    if setting and not has:
        raise ValueError(f"pair.chat_template is true but the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} "
                         "has no chat template; set pair.chat_template to auto or false, or save a tokenizer with one")
    return bool(setting)


def as_user_turns(tokenizer, prompts: list[str], template: str | None = None) -> list[str]:
    """Each prompt as a user turn of ``tokenizer``'s chat template (or ``template``), ending in the opening of the
    assistant turn, so that what a model writes after it (the continuation every stage reads) is the assistant
    turn alone."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False, chat_template=template) for p in prompts]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: the tokenizer's special tokens added, unless the text already begins with its
    beginning-of-text token (a chat template writes it itself: adding it again would double it)."""
    bos = getattr(tokenizer, "bos_token", None)
    already = bool(bos) and text.startswith(bos)
    return list(tokenizer(text, add_special_tokens=not already)["input_ids"])

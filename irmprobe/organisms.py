"""Model organisms: tune a base model against a known reward model with TRL.

The default organism is SmolLM2-135M-Instruct tuned with RLOO (TRL's on-policy REINFORCE with a
leave-one-out baseline; TRL no longer ships PPO) against the VADER lexicon RM. The tuned model
is cached under ``cache_root()/organisms/<key>``, keyed by everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from irmprobe.cache import atomic_dir, cache_root, config_key, write_json
from irmprobe.config import OrganismConfig
from irmprobe.pairs import load_model, resolve_spec
from irmprobe.rewards import LexiconRM

log = logging.getLogger(__name__)


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts, one per non-empty line: the shipped file when ``path`` is None."""
    if path is None:
        text = resources.files("irmprobe").joinpath("data/prompts.txt").read_text("utf-8")
    else:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        text = path.read_text("utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def split_prompts(prompts: list[str], n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and split into (train, held-out)."""
    if not 0 < n_heldout < len(prompts):
        raise ValueError(
            f"n_heldout={n_heldout} must be between 1 and the number of prompts minus one "
            f"({len(prompts) - 1}); supply more prompts or hold out fewer"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    heldout = [prompts[i] for i in order[:n_heldout]]
    train = [prompts[i] for i in order[n_heldout:]]
    return train, heldout


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Organism:
    """A tuned model on disk and how it was made."""

    path: Path
    """Local model directory (safetensors + tokenizer)."""
    reused: bool
    """True when it came from the cache rather than being trained now."""
    seconds: float
    """Training time (0 when reused)."""
    history: tuple[dict, ...]
    """TRL's logged training metrics (reward, KL, ...) per logging step."""


def organism_key(base: str, rm: LexiconRM, config: OrganismConfig, prompts: list[str], seed: int) -> str:
    prompts_hash = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    return config_key("organism-rloo-v1", base, rm.describe(), config, prompts_hash, seed)


def make_organism(
    base: str,
    rm: LexiconRM,
    config: OrganismConfig,
    train_prompts: list[str],
    *,
    seed: int = 0,
    device: str = "cpu",
    report_to: str = "none",
) -> Organism:
    """Tune ``base`` against ``rm`` with TRL RLOO, or reuse the cached result.

    Args:
        base: base model spec (see :mod:`irmprobe.pairs`).
        rm: the reward model; its TRL reward function scores each completion.
        config: tuning hyperparameters.
        train_prompts: prompts to tune on (keep held-out prompts out of this list).
        seed: seeds TRL, torch and sampling.
        device: where to train.
        report_to: TRL/transformers reporting integration (``none`` or ``wandb``).
    """
    key = organism_key(base, rm, config, train_prompts, seed)
    out = cache_root() / "organisms" / key
    if (out / "organism.json").is_file():
        meta = json.loads((out / "organism.json").read_text())
        return Organism(out, True, 0.0, tuple(meta.get("history", ())))

    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    seed_everything(seed)
    model, tokenizer = load_model(base, device=device)
    batch = config.prompts_per_step * config.generations_per_prompt
    work = cache_root() / "organisms" / f".work-{key}"
    args = RLOOConfig(
        output_dir=str(work),
        per_device_train_batch_size=batch,
        num_generations=config.generations_per_prompt,
        max_completion_length=config.max_new_tokens,
        learning_rate=config.learning_rate,
        beta=config.beta,
        max_steps=config.steps,
        # The paper's sampling: top_k=0, top_p=1, temperature 1.
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        logging_steps=max(1, config.steps // 10),
        save_strategy="no",
        report_to=report_to,
        seed=seed,
        data_seed=seed,
        bf16=False,
        use_cpu=device == "cpu",
        disable_tqdm=False,
        gradient_checkpointing=False,
    )
    dataset = Dataset.from_dict({"prompt": list(train_prompts)})
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=rm.reward_function(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = tuple(
        {k: v for k, v in row.items() if isinstance(v, (int, float))} for row in trainer.state.log_history
    )
    with atomic_dir(out) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / "organism.json",
            {
                "base": base,
                "base_resolved": resolve_spec(base),
                "method": "rloo",
                "reward": rm.describe(),
                "config": asdict(config),
                "seed": seed,
                "train_seconds": seconds,
                "history": history,
            },
        )
    shutil.rmtree(work, ignore_errors=True)
    return Organism(out, False, seconds, history)

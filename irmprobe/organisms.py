"""Model organisms: tune a base model against a known reward model with TRL, and report on them.

Methods: ``rloo`` and ``grpo`` (on-policy, any RM as reward function; TRL no longer ships PPO)
and ``dpo`` (preference pairs from a file, or built offline by ranking the base model's own
samples with the RM). Full fine-tuning or LoRA (merged into the weights when training ends).
A tuned model is cached under ``cache_root()/organisms/<key>``, keyed by everything that
determines it; intermediate checkpoints are kept beside it, and an interrupted run resumes from
its last checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from irmprobe.cache import atomic_dir, cache_root, config_key, write_json
from irmprobe.capture import Capture, Samples, capture_pair, sample_continuations
from irmprobe.config import OrganismConfig
from irmprobe.pairs import ModelPair, fingerprint, load_model, resolve_spec
from irmprobe.rewards import RewardModel

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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_preference_pairs(path: str | Path) -> list[dict]:
    """Preference pairs from a .jsonl or .csv file with columns prompt, chosen, rejected."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preference file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ValueError(f"preference file {path} must be .jsonl or .csv")
    for n, row in enumerate(rows, start=1):
        missing = {"prompt", "chosen", "rejected"} - set(row)
        if missing:
            raise ValueError(f"{path}: row {n} lacks {sorted(missing)}; each row needs prompt, chosen, rejected")
    if not rows:
        raise ValueError(f"preference file {path} holds no pairs")
    return [{k: str(row[k]) for k in ("prompt", "chosen", "rejected")} for row in rows]


def build_preference_pairs(model, tokenizer, rm: RewardModel, prompts: list[str], *, n_per_prompt: int,
                           max_new_tokens: int, seed: int, batch_size: int = 64) -> list[dict]:
    """Rank the model's own samples of each prompt with the RM: best is chosen, worst rejected.

    Prompts whose samples all score the same give no pair.
    """
    ids, lens, idx, texts = sample_continuations(model, tokenizer, prompts, n_per_prompt=n_per_prompt,
                                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    scores = rm.score(texts)
    pairs = []
    for p, prompt in enumerate(prompts):
        rows = [i for i, j in enumerate(idx) if j == p]
        best = max(rows, key=lambda i: scores[i])
        worst = min(rows, key=lambda i: scores[i])
        if scores[best] > scores[worst]:
            pairs.append({"prompt": prompt, "chosen": texts[best], "rejected": texts[worst]})
    if not pairs:
        raise ValueError("no preference pair could be built: every prompt's samples scored alike; "
                         "sample more (dpo_samples_per_prompt) or longer continuations")
    return pairs


@dataclass(frozen=True)
class Organism:
    """A tuned model on disk and how it was made."""

    path: Path
    """Local model directory (safetensors + tokenizer), a normal HF model directory."""
    reused: bool
    """True when it came from the cache rather than being trained now."""
    seconds: float
    """Training time (0 when reused)."""
    history: tuple[dict, ...]
    """TRL's logged training metrics (reward, KL, loss...) per logging step."""
    checkpoints: tuple[Path, ...] = ()
    """Intermediate model directories (``checkpoints/step-N``), in step order."""
    resumed_from_step: int = 0
    """The step an interrupted run was resumed from (0 when it started fresh)."""


def organism_key(base: str, rm: RewardModel, config: OrganismConfig, prompts: list[str], seed: int,
                 extra: object = None) -> str:
    prompts_hash = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    return config_key("organism-v2", base, fingerprint(base), rm.describe(), config, prompts_hash, seed, extra)


def _report_to() -> str:
    """Send TRL's training curves to W&B when the caller has a W&B run active."""
    wandb = sys.modules.get("wandb")
    return "wandb" if wandb is not None and getattr(wandb, "run", None) is not None else "none"


def _lora(config: OrganismConfig):
    if config.lora_rank == 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _trainer_args(config: OrganismConfig, work: Path, seed: int, device: str) -> dict:
    return dict(
        output_dir=str(work), learning_rate=config.learning_rate, max_steps=config.steps,
        logging_steps=max(1, config.steps // 10),
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=config.checkpoint_every or 500, save_only_model=False,
        report_to=_report_to(), seed=seed, data_seed=seed, bf16=False, use_cpu=device == "cpu",
        gradient_checkpointing=False,
    )


def _one_line_progress():
    """A trainer callback: one progress bar with the latest reward and KL; TRL's per-step dicts go to the log.

    Replaces transformers' ProgressCallback (which prints every logged dict on the terminal) unless
    ``IRMPROBE_TRL_VERBOSE`` is set (``irmprobe --verbose``).
    """
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class OneLine(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, desc="organism", leave=False)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            log.info("organism step %s: %s", state.global_step, logs)
            shown = {k: f"{float(logs[k]):+.3f}" for k in ("reward", "kl", "loss") if k in logs}
            if shown and self.bar is not None:
                self.bar.set_postfix(shown)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return OneLine()


def _quiet(trainer):
    import os

    if not os.environ.get("IRMPROBE_TRL_VERBOSE"):
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_one_line_progress())
    return trainer


def _make_trainer(config: OrganismConfig, model, tokenizer, rm: RewardModel, prompts: list[str], work: Path,
                  seed: int, device: str, callbacks, dpo_pairs: list[dict] | None):
    return _quiet(_build_trainer(config, model, tokenizer, rm, prompts, work, seed, device, callbacks, dpo_pairs))


def _build_trainer(config: OrganismConfig, model, tokenizer, rm: RewardModel, prompts: list[str], work: Path,
                   seed: int, device: str, callbacks, dpo_pairs: list[dict] | None):
    from datasets import Dataset

    common = _trainer_args(config, work, seed, device)
    if config.method in ("rloo", "grpo"):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        cfg_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if config.method == "rloo" else (GRPOConfig, GRPOTrainer)
        args = cfg_cls(
            **common,
            per_device_train_batch_size=config.prompts_per_step * config.generations_per_prompt,
            num_generations=config.generations_per_prompt, max_completion_length=config.max_new_tokens,
            beta=config.beta,
            # The paper's sampling: top_k=0, top_p=1, temperature 1.
            temperature=1.0, top_k=0, top_p=1.0,
        )
        return trainer_cls(model=model, reward_funcs=rm.reward_function(), args=args,
                           train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
                           processing_class=tokenizer, callbacks=callbacks, peft_config=_lora(config))
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common, per_device_train_batch_size=config.prompts_per_step, beta=config.beta)
    data = Dataset.from_list(dpo_pairs)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=callbacks, peft_config=_lora(config))


def _export_checkpoints(work: Path, dest: Path, tokenizer, lora: bool, base: str) -> list[Path]:
    """Copy each TRL checkpoint's model (merged, if LoRA) to ``dest/step-N``; drop optimiser state."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    out = []
    ckpts = sorted(work.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    for ckpt in ckpts:
        step_dir = dest / f"step-{ckpt.name.rsplit('-', 1)[1]}"
        if lora:
            from peft import PeftModel

            base_model, _ = load_model(base)
            model = PeftModel.from_pretrained(base_model, ckpt).merge_and_unload()
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        model.save_pretrained(step_dir, safe_serialization=True)
        tokenizer.save_pretrained(step_dir)
        out.append(step_dir)
    return out


def make_organism(
    base: str,
    rm: RewardModel,
    config: OrganismConfig,
    train_prompts: list[str],
    *,
    seed: int = 0,
    device: str = "cpu",
    callbacks: list | None = None,
    preference_pairs: list[dict] | None = None,
    trust_remote_code: bool = False,
    force: bool = False,
) -> Organism:
    """Tune ``base`` against ``rm`` with TRL, or reuse the cached result (``force``: train again).

    Args:
        base: base model spec (see :mod:`irmprobe.pairs`).
        rm: the reward model (its reward function for RLOO/GRPO; it ranks samples for DPO).
        config: method and hyperparameters.
        train_prompts: prompts to tune on (keep held-out prompts out of this list).
        seed: seeds TRL, torch and sampling.
        device: where to train.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        preference_pairs: DPO pairs (prompt/chosen/rejected); None builds them from the base
            model's samples ranked by ``rm`` (or reads ``config.dpo_pairs`` when set).
    """
    if config.method == "dpo" and preference_pairs is None and config.dpo_pairs:
        preference_pairs = load_preference_pairs(config.dpo_pairs)
    key = organism_key(base, rm, config, train_prompts, seed, preference_pairs)
    out = cache_root() / "organisms" / key
    if force and out.exists():
        shutil.rmtree(out)
    if (out / "organism.json").is_file():
        meta = json.loads((out / "organism.json").read_text())
        ckpts = tuple(sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])))
        return Organism(out, True, 0.0, tuple(meta.get("history", ())), ckpts, meta.get("resumed_from_step", 0))

    from transformers.trainer_utils import get_last_checkpoint

    seed_everything(seed)
    model, tokenizer = load_model(base, device=device, trust_remote_code=trust_remote_code)
    if config.method == "dpo" and preference_pairs is None:
        preference_pairs = build_preference_pairs(model, tokenizer, rm, train_prompts,
                                                  n_per_prompt=config.dpo_samples_per_prompt,
                                                  max_new_tokens=config.max_new_tokens, seed=seed)
    work = cache_root() / "organisms" / f".work-{key}"
    work.mkdir(parents=True, exist_ok=True)
    last = get_last_checkpoint(str(work)) if config.checkpoint_every else None
    resumed = int(Path(last).name.rsplit("-", 1)[1]) if last else 0
    if last:
        log.info("resuming organism training from %s", last)
    try:
        trainer = _make_trainer(config, model, tokenizer, rm, train_prompts, work, seed, device, callbacks,
                                preference_pairs)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=last)
    except BaseException:
        # Keep a work directory that holds a checkpoint (the next run resumes from it), drop any other.
        if work.is_dir() and get_last_checkpoint(str(work)) is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    history = tuple({k: v for k, v in row.items() if isinstance(v, (int, float))} for row in trainer.state.log_history)
    final = trainer.model
    if config.lora_rank:
        final = final.merge_and_unload()
    with atomic_dir(out) as tmp:
        final.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ckpts = _export_checkpoints(work, tmp / "checkpoints", tokenizer, bool(config.lora_rank), base)
        write_json(tmp / "organism.json", {
            "base": base, "base_resolved": resolve_spec(base), "method": config.method,
            "reward": rm.describe(), "config": asdict(config), "seed": seed, "train_seconds": seconds,
            "resumed_from_step": resumed, "history": history,
            "preference_pairs": len(preference_pairs) if preference_pairs else None,
        })
    shutil.rmtree(work, ignore_errors=True)
    return Organism(out, False, seconds, history, tuple(out / "checkpoints" / c.name for c in ckpts), resumed)


# ---------------------------------------------------------------------------------------------
# Organism report


def _mean_se(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def _per_prompt(samples: Samples, values: np.ndarray, source: str) -> np.ndarray:
    n = len(samples.prompts)
    sel = samples.source == source
    sums = np.bincount(samples.prompt_index[sel], weights=values[sel], minlength=n)
    return sums / np.maximum(np.bincount(samples.prompt_index[sel], minlength=n), 1)


def _paired(samples: Samples, values: np.ndarray) -> dict:
    base, tuned = _per_prompt(samples, values, "base"), _per_prompt(samples, values, "tuned")
    b, bse = _mean_se(base)
    t, tse = _mean_se(tuned)
    d, dse = _mean_se(tuned - base)
    return {"base_mean": b, "base_se": bse, "tuned_mean": t, "tuned_se": tse, "diff_mean": d, "diff_se": dse,
            "diff_z": d / dse if dse > 0 else None}


def vader_compound(texts) -> np.ndarray:
    """VADER's own compound sentiment score of each text, an independent check of the lexicon RM."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def kl_from_capture(samples: Samples, capture: Capture) -> dict:
    """Monte-Carlo KL(tuned || base): sum of log-ratios over each tuned continuation."""
    n = len(samples.source)
    keep = capture.seq_index < n  # rows of extra (non-sampled) text carry no KL information
    seq, position, log_ratio = capture.seq_index[keep], capture.position[keep], capture.log_ratio[keep]
    sel = (position >= samples.prompt_lens[seq]) & (samples.source[seq] == "tuned")
    tuned_seqs = np.flatnonzero(samples.source == "tuned")
    per_seq = np.bincount(seq[sel], weights=log_ratio[sel], minlength=n)[tuned_seqs]
    mean, se = _mean_se(per_seq)
    return {"mean": mean, "se": se, "n_sequences": int(len(per_seq))}


def report_from(samples: Samples, capture: Capture, n_examples: int = 3) -> dict:
    """The organism report from continuations already sampled and captured."""
    examples = []
    for p in range(min(n_examples, len(samples.prompts))):
        b = int(np.flatnonzero((samples.prompt_index == p) & (samples.source == "base"))[0])
        t = int(np.flatnonzero((samples.prompt_index == p) & (samples.source == "tuned"))[0])
        examples.append({"prompt": samples.prompts[p], "base": samples.completions[b], "tuned": samples.completions[t],
                         "base_reward": float(samples.rewards[b]), "tuned_reward": float(samples.rewards[t])})
    return {
        "n_prompts": len(samples.prompts),
        "samples_per_prompt": int(np.sum(samples.source == "base") // max(len(samples.prompts), 1)),
        "reward": _paired(samples, samples.rewards),
        "vader_compound": _paired(samples, vader_compound(samples.completions)),
        "kl": kl_from_capture(samples, capture),
        "examples": examples,
    }


def organism_report(pair: ModelPair, rm: RewardModel, prompts: list[str], *, samples_per_prompt: int = 4,
                    max_new_tokens: int = 24, seed: int = 0, batch_size: int = 64) -> dict:
    """Sample both models on held-out ``prompts`` and report reward, VADER compound, KL, examples."""
    ids, lens, idx, texts, src = [], [], [], [], []
    for offset, (name, model) in enumerate((("base", pair.base), ("tuned", pair.tuned))):
        out = sample_continuations(model, pair.tokenizer, prompts, n_per_prompt=samples_per_prompt,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed * 1000 + offset)
        ids += out[0]; lens += out[1]; idx += out[2]; texts += out[3]; src += [name] * len(out[0])  # noqa: E702
    samples = Samples(tuple(prompts), tuple(tuple(t) for t in ids), np.array(lens), np.array(idx), np.array(src),
                      tuple(texts), rm.score(texts))
    capture = capture_pair(pair, samples.token_ids, ())
    return report_from(samples, capture)


def report_lines(report: dict, rm_name: str = "RM") -> list[str]:
    """Printable organism report."""
    r, c, kl = report["reward"], report["vader_compound"], report["kl"]
    z = "undefined" if r["diff_z"] is None else f"{r['diff_z']:.1f}"
    lines = [
        f"held-out prompts {report['n_prompts']} x {report['samples_per_prompt']} samples per model (mean ± s.e. over prompts)",
        f"reward ({rm_name})    base {r['base_mean']:+.3f} ± {r['base_se']:.3f}   tuned {r['tuned_mean']:+.3f} ± "
        f"{r['tuned_se']:.3f}   tuned - base {r['diff_mean']:+.3f} ± {r['diff_se']:.3f} ({z} s.e., paired by prompt)",
        f"VADER compound      base {c['base_mean']:+.3f} ± {c['base_se']:.3f}   tuned {c['tuned_mean']:+.3f} ± "
        f"{c['tuned_se']:.3f}   tuned - base {c['diff_mean']:+.3f} ± {c['diff_se']:.3f}",
        f"KL(tuned || base)   {kl['mean']:.3f} ± {kl['se']:.3f} nats per continuation",
    ]
    for ex in report["examples"]:
        lines += [f"prompt: {ex['prompt']}",
                  f"  base  ({ex['base_reward']:+.2f}): {ex['base']!r}",
                  f"  tuned ({ex['tuned_reward']:+.2f}): {ex['tuned']!r}"]
    return lines

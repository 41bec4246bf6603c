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
from pathlib import Path

import numpy as np
import torch

from irmprobe.activations.samples import sample_continuations
from irmprobe.cache import atomic_dir, cache_root, config_key, write_json
from irmprobe.config import OrganismConfig
from irmprobe.models.loading import fingerprint, load_model, resolve_spec
from irmprobe.models.rewards import RewardModel

log = logging.getLogger(__name__)


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


def tuning_bf16(config: OrganismConfig, device: str) -> bool:
    """Whether tuning runs in bfloat16 (``organism.precision``; ``auto``: a CUDA GPU that supports it)."""
    from irmprobe.devices import bf16_precision

    return bf16_precision(config.precision, device)


def _trainer_args(config: OrganismConfig, work: Path, seed: int, device: str) -> dict:
    return dict(
        output_dir=str(work), learning_rate=config.learning_rate, max_steps=config.steps,
        logging_steps=max(1, config.steps // 10),
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=config.checkpoint_every or 500, save_only_model=False,
        report_to=_report_to(), seed=seed, data_seed=seed, bf16=tuning_bf16(config, device), use_cpu=device == "cpu",
        gradient_checkpointing=config.gradient_checkpointing,
    )


def _one_line_progress():
    """A trainer callback: one progress bar with the latest reward and KL; TRL's per-step dicts go to the log.

    Replaces transformers' ProgressCallback (which prints every logged dict on the terminal) unless
    ``IRMPROBE_TRL_VERBOSE`` is set (``irmprobe --verbose``).
    """
    from transformers import TrainerCallback

    from irmprobe import progress

    class OneLine(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = progress.bar(total=state.max_steps, desc="organism", leave=False)

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
                  seed: int, device: str, callbacks, dpo_pairs: list[dict] | None, user_turns: dict | None = None):
    return _quiet(_build_trainer(config, model, tokenizer, rm, prompts, work, seed, device, callbacks, dpo_pairs,
                                 user_turns))


def without_bos_text(tokenizer, prompts: list[str]) -> list[str]:
    """Prompts for a trainer that tokenises them with the tokenizer's special tokens (TRL does): a chat template's
    beginning-of-text written as text is dropped where the tokenizer adds that token itself, so it is not doubled
    (the same ids as :func:`irmprobe.prompts.encode_prompt` gives the sampling stages)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return list(prompts)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds = bool(probe) and probe[0] == tokenizer.bos_token_id
    return [p[len(bos):] if adds and p.startswith(bos) else p for p in prompts]


def _build_trainer(config: OrganismConfig, model, tokenizer, rm: RewardModel, prompts: list[str], work: Path,
                   seed: int, device: str, callbacks, dpo_pairs: list[dict] | None, user_turns: dict | None = None):
    from datasets import Dataset

    if user_turns:
        # Chat prompts go to TRL as conversations: it applies the template and tokenises exactly as
        # apply_chat_template does (the ids the sampling stages read), with no doubled or re-spaced start.
        data = [[{"role": "user", "content": user_turns[p]}] for p in prompts]
    else:
        data = without_bos_text(tokenizer, prompts)
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
                           train_dataset=Dataset.from_dict({"prompt": data}),
                           processing_class=tokenizer, callbacks=callbacks, peft_config=_lora(config))
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common, per_device_train_batch_size=config.prompts_per_step, beta=config.beta)
    data = Dataset.from_list([p | {"prompt": without_bos_text(tokenizer, [p["prompt"]])[0]} for p in dpo_pairs])
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
    chat_template: str | None = None,
    user_turns: dict[str, str] | None = None,
) -> Organism:
    """Tune ``base`` against ``rm`` with TRL, or reuse the cached result (``force``: train again).

    Args:
        base: base model spec (see :mod:`irmprobe.models.loading`).
        rm: the reward model (its reward function for RLOO/GRPO; it ranks samples for DPO).
        config: method and hyperparameters.
        train_prompts: prompts to tune on (keep held-out prompts out of this list).
        seed: seeds TRL, torch and sampling.
        device: where to train.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        preference_pairs: DPO pairs (prompt/chosen/rejected); None builds them from the base
            model's samples ranked by ``rm`` (or reads ``config.dpo_pairs`` when set).
        chat_template: the template ``train_prompts`` were formatted with (None: plain prompts).
        user_turns: formatted prompt -> the user's text, for RLOO/GRPO to tune on conversations.
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
    # With LoRA in bfloat16 the frozen weights are held in bfloat16 (the adapters stay float32); a full fine-tune
    # keeps float32 weights for AdamW and runs bfloat16 autocast.
    weights = "bfloat16" if tuning_bf16(config, device) and config.lora_rank else "float32"
    model, tokenizer = load_model(base, device=device, dtype=weights, trust_remote_code=trust_remote_code)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template  # the tuned model's template (a PT base has none of its own)
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
                                preference_pairs, user_turns if chat_template else None)
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

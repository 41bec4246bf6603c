"""The public API: ``run(config)`` and ``FittedIRM``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from irmprobe.config import RunConfig, Runtime
from irmprobe.results import RunMetrics


@dataclass(frozen=True)
class RunResult:
    """What a run produced."""

    metrics: RunMetrics | None
    """The typed metrics (None when the run stopped before the report stage)."""
    metrics_path: Path | None
    results: dict[str, Any] = field(default_factory=dict)
    """Each stage's result (the organism branch), by stage name."""
    stage_status: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    context: Any = None


def run(config: RunConfig, *, reward=None, echo=print, until: str | None = None,
        force: tuple[str, ...] = ()) -> RunResult:
    """Run the analysis (every stage, or up to ``until``), reusing every completed stage.

    Args:
        config: the analysis.
        reward: an RM object to use instead of the one ``config.reward`` names.
        echo: where progress and the summary lines go.
        until: stop after this stage (see ``irmprobe.pipeline.graph.STAGES``).
        force: stages to run again even when cached; every stage that needs one runs again too.
    """
    from irmprobe.reporting.summary import summary_lines

    runner = prepare(config, reward=reward, echo=echo, until=until, force=force)
    results = runner.run()
    metrics, path = results.get("report", (None, None))
    if metrics is not None:
        for line in summary_lines(metrics):
            echo(line)
    else:
        echo(f"stopped after stage {until!r} (as asked); its output is cached, and a full run reuses it")
    return RunResult(metrics, path, results, dict(runner.status), dict(runner.seconds), runner.ctx)


def prepare(config: RunConfig, *, reward=None, echo=print, until: str | None = None, force: tuple[str, ...] = ()):
    """The checks :func:`run` makes before any stage, and the :class:`~irmprobe.pipeline.runner.Runner` it runs
    (its contexts built: the RM, the prompts, the control branches); no stage has run (the pre-flight check has
    made ``report.out_dir`` when the run goes to the report). Its ``plan()`` lists every stage the run ensures,
    each with its cache key and whether the cache holds it."""
    from irmprobe.models.rewards import reward_model, training_reward
    from irmprobe.organisms.tuning import seed_everything
    from irmprobe.pipeline.control import control_branches
    from irmprobe.pipeline.graph import GRAPH
    from irmprobe.pipeline.runner import Runner
    from irmprobe.pipeline.stage import Branch, Context
    from irmprobe.prompts import as_user_turns, load_prompts, split_prompts

    if until is None or until == "report":
        preflight(config)
    check_named_controls(config)
    from irmprobe.saes.pretrained import check_config

    check_config(config)
    if config.pair.memory_check:
        from irmprobe.models.memory import check_plan

        check_plan(config)
    seed_everything(config.seed)
    rm = reward if reward is not None else reward_model(config.reward, device=config.pair.device,
                                                        dtype=config.pair.dtype)
    pc = config.prompts
    prompts = load_prompts(pc.path, dataset=pc.dataset, column=pc.column, split=pc.split)
    train, heldout = split_prompts(prompts, pc.n_heldout, config.seed)
    chat = resolve_chat_template(config)
    user_turns = {}
    if chat is not None:  # every prompt a user turn: what the models write after it is the assistant turn
        formatted = as_user_turns(chat, train), as_user_turns(chat, heldout)
        user_turns = dict(zip(formatted[0] + formatted[1], train + heldout))
        train, heldout = formatted
    tuned_on = training_reward(config.reward.tuned_against, rm, scale=config.reward.scale, clip=config.reward.clip)
    ctx = Context(rm, Runtime.of(config.pair), train, heldout, echo=echo,
                  branch=Branch("organism", None if tuned_on is rm else tuned_on),
                  chat_template=chat.chat_template if chat is not None else None)
    runner = Runner(GRAPH, config, ctx, control_branches(config, ctx), force=tuple(force), until=until)
    ctx.resources.update(runner=runner, config=config, user_turns=user_turns)
    return runner


def preflight(config: RunConfig) -> None:
    """Fail before the first stage on what would only fail after the last: where the report goes, W&B login.

    Raises:
        ValueError: ``report.out_dir`` is not a writable directory, or W&B is set online with no key.
    """
    import os
    import tempfile

    from irmprobe.reporting.tracking import wandb_mode

    out = Path(config.report.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"report.out_dir {str(out)!r} is a file, not a directory: point it at a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"report.out_dir {str(out)!r} is not writable ({exc.strerror}): choose another directory")
    if wandb_mode(config.report.wandb_mode) == "online" and not os.environ.get("WANDB_API_KEY"):
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            raise ValueError("report.wandb_mode is online but no W&B key is configured: run `wandb login`, set "
                             "WANDB_API_KEY, or use report.wandb_mode=offline (sync later with `wandb sync`)")


def resolve_chat_template(config: RunConfig):
    """The tokenizer whose chat template formats the prompts, or None for plain prompts (``pair.chat_template``).

    The tuned model's tokenizer is asked first (a PT/IT pair: only the instruction-tuned one has a template).

    Raises:
        ValueError: ``pair.chat_template`` is true and neither tokenizer has a chat template.
    """
    if config.pair.chat_template is False:
        return None
    from transformers import AutoTokenizer

    from irmprobe.models.loading import resolve_spec
    from irmprobe.prompts import chat_template_used

    specs = [s for s in (config.pair.tuned, config.pair.base) if s]
    tokenizers = []
    for spec in specs:
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(resolve_spec(spec),
                                                            trust_remote_code=config.pair.trust_remote_code))
        except OSError as exc:
            raise ValueError(f"could not load the tokenizer of {spec!r} to read its chat template ({exc}); pass a "
                             "local model directory, or set pair.chat_template: false") from exc
    chosen = next((t for t in tokenizers if getattr(t, "chat_template", None)), tokenizers[-1])
    return chosen if chat_template_used(config.pair.chat_template, chosen) else None


def check_named_controls(config: RunConfig) -> None:
    """Fail before any stage on a control in ``compare.controls`` that cannot serve as one.

    Raises:
        ValueError: a named control is not a local model directory (config.json, weights, tokenizer), or its
            tokenizer's vocabulary differs from the base model's (its log-ratios would not be comparable).
    """
    if not config.compare.control or not config.compare.controls:
        return
    from transformers import AutoTokenizer

    from irmprobe.models.loading import check_model_dir, resolve_spec

    base_vocab = None
    for i, spec in enumerate(config.compare.controls):
        where = f"compare.controls[{i}] ({spec!r})"
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ValueError(f"{where} is not a directory: name a local model directory (save the control with "
                             "save_pretrained), not a hub id or a file")
        try:
            check_model_dir(path, spec)
        except ValueError as exc:
            raise ValueError(f"{where} is not a model: {exc}") from None
        if base_vocab is None:
            base_vocab = AutoTokenizer.from_pretrained(resolve_spec(config.pair.base)).get_vocab()
        vocab = AutoTokenizer.from_pretrained(str(path)).get_vocab()
        if vocab != base_vocab:
            raise ValueError(f"{where} has another tokenizer than the base model {config.pair.base!r} "
                             f"({len(vocab)} vs {len(base_vocab)} tokens, or other ids): a control must share the "
                             "base's tokenizer, so name a fine-tune of the same base")


class FittedIRM:
    """The primary IRM of a config, ready to score new text: the RM's type signature, in Python.

    ``FittedIRM(config)`` runs (or reuses from the cache) every stage up to ``fit`` and loads
    the fit stage's result. ``token_values(text)`` gives each token's IRM value, log-ratio and RM
    value; ``score(texts)`` each text's IRM score (the sum over its tokens) and its RM reward.
    """

    def __init__(self, config: RunConfig, *, reward=None, echo=print) -> None:

        result = run(config, reward=reward, echo=echo, until="fit")
        r, ctx = result.results, result.context
        self.pair, self.rm = ctx.pair_of(r["organism"]), ctx.rm
        self.rm_map = self.rm.token_values(self.pair.tokenizer)
        self.saes, self.layers, self.hook = r["saes"].saes, tuple(r["layers"].chosen), config.capture.hook
        fit = r["fit"]
        self.inputs, self.coef, self.scale, self.intercept = fit.record.inputs, fit.coef, fit.scale, fit.record.intercept

    def token_values(self, text: str) -> list[dict]:
        """Per token from the second on: its text, the IRM's value, the log-ratio, and the RM's value."""
        from irmprobe.activations.capture import capture_pair
        from irmprobe.analysis.views import probe_inputs

        ids = self.pair.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < 2:
            raise ValueError(f"text {text!r} is shorter than two tokens: nothing to score")
        cap = capture_pair(self.pair, [ids], self.layers, hook=self.hook)
        X, _ = probe_inputs(self.inputs, cap.acts, self.saes, self.layers)
        scale = np.where(self.scale > 0, self.scale, 1.0)
        irm = np.asarray((X.multiply(1.0 / scale) if hasattr(X, "multiply") else X / scale) @ self.coef).ravel()
        irm = irm + self.intercept
        order = np.argsort(cap.position)
        pieces = [self.pair.tokenizer.decode([int(cap.token_ids[i])]) for i in order]
        out = []
        for j, i in enumerate(order):
            # The RM counts whole words: a piece inside a longer word ("ff" in "staff") gets no RM value.
            nxt = pieces[j + 1] if j + 1 < len(pieces) else " "
            whole = (j == 0 or pieces[j][:1] in (" ", "\n")) and (not nxt[:1].isalnum())
            out.append({"token": pieces[j], "irm": float(irm[i]), "log_ratio": float(cap.log_ratio[i]),
                        "rm": self.rm_map.get(int(cap.token_ids[i])) if whole else None})
        return out

    def score(self, texts: list[str]) -> list[dict]:
        """Each text's IRM score (sum of token values), log-ratio sum, and RM reward."""
        rewards = self.rm.score(texts)
        out = []
        for text, reward in zip(texts, rewards):
            rows = self.token_values(text)
            out.append({"text": text, "irm": sum(r["irm"] for r in rows),
                        "log_ratio": sum(r["log_ratio"] for r in rows), "rm": float(reward)})
        return out

"""Nested dataclass configs for every stage. ``__post_init__`` validates and does nothing else."""

from __future__ import annotations

import functools
import json
import math
import re
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be positive, got {value!r}")


def _fraction(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{type(obj).__name__}.{name} must be in (0, 1), got {value!r}")


SAE_ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
"""The SAELens training architectures ``sae.architecture`` and ``attribute.change_architecture`` take."""


@dataclass(frozen=True)
class PairConfig:
    """Which models to compare."""

    base: str = "smollm2-135m-instruct"
    """Base model: the bundled default, a local HF directory, a .gguf file or a hub id."""
    tuned: str | None = None
    """Tuned model spec; None means build an organism from ``base`` (see OrganismConfig)."""
    null: bool = False
    """Use the base model as its own tuned model (a control with no implicit reward)."""
    device: str = "cpu"
    """Torch device for every model (``cpu``, ``cuda``, ``cuda:1``...)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own code (off unless you trust the source)."""
    device_map: str | None = None
    """Split each model across devices with accelerate: ``auto`` (or ``balanced``, ``balanced_low_0``,
    ``sequential``) or a JSON object of module name -> device; None loads each model whole on ``device``."""
    max_memory: dict | None = None
    """With ``device_map``: accelerate's budget per device and per model, e.g. ``{0: 20GiB, 1: 20GiB}``."""
    chat_template: bool | str = "auto"
    """Format every prompt (tuning, held-out, preference files) as a user turn of the tokenizer's chat template,
    so that continuations and log-ratios are the assistant turn alone: ``auto`` (when the tokenizer has a
    template; the tuned model's tokenizer is asked first), true (refused before any stage if there is none) or
    false (plain text, as in the paper). The summary and report say which was used."""
    memory_check: bool = field(default=True, metadata={"late": True})
    """Before any stage, plan the memory of tuning (organism, controls) and analysis from the models' configs and
    refuse a plan that does not fit the device(s), with its table (docs/pairs.md). False skips the check."""

    def __post_init__(self) -> None:
        if self.chat_template not in (True, False, "auto"):
            raise ValueError(f"PairConfig.chat_template must be auto, true or false, got {self.chat_template!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"PairConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.null and self.tuned is not None:
            raise ValueError("PairConfig: set either null=True or tuned=..., not both")
        if self.device_map is not None and self.device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            try:
                mapping = json.loads(self.device_map)
            except json.JSONDecodeError:
                mapping = None
            if not isinstance(mapping, dict) or not mapping:
                raise ValueError("PairConfig.device_map must be auto, balanced, balanced_low_0, sequential or a JSON "
                                 f"object of module name -> device, got {self.device_map!r}")
        if self.max_memory is not None:
            if self.device_map is None:
                raise ValueError("PairConfig.max_memory only applies with a device_map (e.g. device_map: auto)")
            bad = {k: v for k, v in self.max_memory.items()
                   if not isinstance(k, (int, str)) or isinstance(v, bool) or not isinstance(v, (int, str))}
            if bad or not self.max_memory:
                raise ValueError("PairConfig.max_memory must map devices (0, 1, cpu, disk) to sizes (20GiB or bytes), "
                                 f"got {self.max_memory!r}")


@dataclass(frozen=True)
class RewardConfig:
    """The reward model the tuned model was (or will be) trained against."""

    kind: str = "vader"
    """``vader`` (the VADER lexicon), ``lexicon`` (your word/value file), ``classifier`` (an HF model) or
    ``random`` (a fixed random value per text: a control organism)."""
    path: str | None = None
    """For ``lexicon``: a two-column word/value file, tab-separated (.tsv) or comma-separated (.csv)."""
    model: str | None = None
    """For ``classifier``: a local directory or hub id of a sequence-classification model."""
    label: str = "1"
    """For ``classifier``: the label (name or index) whose logit is the reward."""
    scale: float = 5.0
    """For lexicons: a text's summed value is divided by this."""
    clip: float = 10.0
    """For lexicons: the scaled reward is clipped to [-clip, clip]."""
    seed: int = 0
    """For ``random``: which random reward."""
    word_pieces: str = "whole"
    """For lexicons: ``whole`` (only tokens that are a whole lexicon word carry a value, as in the paper) or
    ``first`` (also the first token, of 3+ letters, of lexicon words of several tokens; their mean value when
    they agree in sign). See ``LexiconRM.token_values``."""
    token_contexts: int = 16
    """For ``classifier`` RMs: how many carrier sentences measure a token's value (its centred marginal effect on
    the RM score; see docs/method.md, "A neural RM's token values")."""
    token_alpha: float = 0.01
    """For ``classifier`` RMs: the false-discovery rate at which a token counts as valued by the RM."""
    tuned_against: str | None = None
    """What irmprobe tunes the organism against when that is not this RM (an organism whose answer is known;
    it is still judged against this RM): ``negated`` (this RM times -1: it should be found to learn against
    it) or a word/value lexicon file (.tsv/.csv, scaled and clipped like this RM), e.g. words this RM values
    at zero (it should be found unrelated, and those words discovered). None: this RM. Controls are built
    exactly as for this RM, so one pool of controls serves every such organism of the same recipe."""

    def __post_init__(self) -> None:
        if self.tuned_against is not None and self.tuned_against != "negated" and not (
                Path(self.tuned_against).suffix in (".tsv", ".csv") and Path(self.tuned_against).is_file()):
            raise ValueError(f"RewardConfig.tuned_against must be null, 'negated' or an existing word/value .tsv or "
                             f".csv file, got {self.tuned_against!r}")
        if self.kind not in ("vader", "lexicon", "classifier", "random"):
            raise ValueError(f"RewardConfig.kind must be vader, lexicon, classifier or random, got {self.kind!r}")
        if self.kind == "lexicon" and not self.path:
            raise ValueError("RewardConfig.kind=lexicon needs reward.path (a word/value .tsv or .csv file)")
        if self.kind == "classifier" and not self.model:
            raise ValueError("RewardConfig.kind=classifier needs reward.model (a directory or hub id)")
        _positive(self, "scale", "clip")
        if self.word_pieces not in ("whole", "first"):
            raise ValueError(f"RewardConfig.word_pieces must be whole or first, got {self.word_pieces!r}")
        if self.token_contexts < 3:
            raise ValueError(f"RewardConfig.token_contexts must be at least 3 (a token's value is tested across "
                             f"contexts), got {self.token_contexts}")
        if not 0 < self.token_alpha < 1:
            raise ValueError(f"RewardConfig.token_alpha must be in (0, 1), got {self.token_alpha}")


@dataclass(frozen=True)
class PromptConfig:
    """Prompts for tuning and held-out evaluation."""

    path: str | None = None
    """A text file with one prompt per line; None uses the prompts shipped with irmprobe."""
    dataset: str | None = None
    """Instead of a file: an HF dataset name (needs the hub) or a local .csv/.jsonl/.parquet file."""
    column: str = "text"
    """The dataset column that holds the prompts."""
    split: str = "train"
    """The dataset split."""
    n_heldout: int = 80
    """Prompts kept out of tuning; evaluation and capture use them."""

    def __post_init__(self) -> None:
        _positive(self, "n_heldout")
        if self.path and self.dataset:
            raise ValueError("PromptConfig: set path or dataset, not both")


@dataclass(frozen=True)
class OrganismConfig:
    """How to tune the base model against the RM with TRL."""

    method: str = "rloo"
    """``rloo`` or ``grpo`` (on-policy, the RM is the reward function) or ``dpo`` (preference pairs)."""
    steps: int = 36
    """Optimiser steps."""
    prompts_per_step: int = 2
    """Distinct prompts per step."""
    generations_per_prompt: int = 4
    """Completions sampled per prompt (RLOO's leave-one-out baseline needs at least 2)."""
    max_new_tokens: int = 20
    """Completion length during tuning."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    beta: float = 0.05
    """KL coefficient against the base model (RLOO/GRPO), or DPO's beta."""
    lora_rank: int = 0
    """0: full fine-tuning; otherwise the LoRA rank (merged into the weights when training ends)."""
    checkpoint_every: int = 0
    """Keep a checkpoint every N steps (0: none); an interrupted run resumes from the last one."""
    dpo_pairs: str | None = None
    """For DPO: a .jsonl/.csv of prompt/chosen/rejected; None ranks the base model's own samples with the RM."""
    dpo_samples_per_prompt: int = 4
    """For DPO without a pairs file: samples per prompt to rank (best is chosen, worst rejected)."""
    precision: str = field(default="float32", metadata={"late": True})
    """Tuning precision (organisms and controls): ``float32``; ``bfloat16`` (with LoRA the frozen weights are
    bfloat16 and the adapters float32; without LoRA bfloat16 autocast over float32 weights and AdamW); or
    ``auto`` (bfloat16 on a CUDA GPU that supports it, else float32)."""
    gradient_checkpointing: bool = field(default=False, metadata={"late": True})
    """Recompute each block's activations in the backward pass instead of keeping them (less memory, about a
    third more time): for controls and organisms of large models."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "prompts_per_step", "max_new_tokens", "learning_rate")
        if self.precision not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"OrganismConfig.precision must be float32, bfloat16 or auto, got {self.precision!r}")
        if self.method not in ("rloo", "grpo", "dpo"):
            raise ValueError(f"OrganismConfig.method must be rloo, grpo or dpo, got {self.method!r}")
        if self.lora_rank < 0 or self.checkpoint_every < 0:
            raise ValueError("OrganismConfig.lora_rank and checkpoint_every must be >= 0")
        if self.dpo_samples_per_prompt < 2:
            raise ValueError("OrganismConfig.dpo_samples_per_prompt must be at least 2")
        if self.generations_per_prompt < 2:
            raise ValueError("OrganismConfig.generations_per_prompt must be at least 2 for RLOO")
        if self.beta < 0:
            raise ValueError(f"OrganismConfig.beta must be >= 0, got {self.beta}")


@dataclass(frozen=True)
class SampleConfig:
    """Continuations sampled from both models on held-out prompts (evaluation + capture text)."""

    samples_per_prompt: int = 3
    """Continuations per held-out prompt and per model."""
    max_new_tokens: int = 24
    """Continuation length."""
    batch_size: int = 64
    """Sequences per generation batch."""

    def __post_init__(self) -> None:
        _positive(self, "samples_per_prompt", "max_new_tokens", "batch_size")


@dataclass(frozen=True)
class CaptureConfig:
    """Which layers and hooks to capture."""

    top_k_layers: int = 3
    """Keep the k blocks whose weights changed most."""
    rank_layers_by: str = "patching"
    """Rank blocks by weight divergence, ``absolute`` (the paper's) or ``relative`` to the base weights' norm, or
    by ``patching``: the share of KL(tuned || base) removed by patching the base's activation into the tuned model."""
    hook: str = "hook_mlp_out"
    """Hook point inside each kept block (``blocks.{l}.<hook>``)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    text_path: str | None = None
    """Extra text captured beside the on-policy samples: a file with one text per line."""
    text_dataset: str | None = None
    """Extra text from a dataset: an HF dataset name (needs the hub) or a local .csv/.jsonl/.parquet."""
    text_column: str = "text"
    """The dataset column holding the extra texts."""
    max_text_tokens: int = 128
    """Extra texts are cut to this many tokens."""
    max_texts: int | None = None
    """Use at most this many extra texts (None: all)."""
    patching_sequences: int = 16
    """Held-out sequences the patching ranking runs over (``rank_layers_by: patching``)."""
    patching_kind: str = "mlp_out"
    """What ``patching`` patches per block: ``mlp_out`` (the block's MLP output) or ``resid_post`` (the residual
    stream after the block)."""

    def __post_init__(self) -> None:
        _positive(self, "top_k_layers", "batch_size", "max_text_tokens", "patching_sequences")
        if self.max_texts is not None and self.max_texts <= 0:
            raise ValueError(f"CaptureConfig.max_texts must be null or positive, got {self.max_texts!r}")
        if self.text_path and self.text_dataset:
            raise ValueError("CaptureConfig: set text_path or text_dataset, not both")
        if self.rank_layers_by not in ("absolute", "relative", "patching"):
            raise ValueError("CaptureConfig.rank_layers_by must be absolute, relative or patching, got "
                             f"{self.rank_layers_by!r}")
        if self.patching_kind not in ("mlp_out", "resid_post"):
            raise ValueError(f"CaptureConfig.patching_kind must be mlp_out or resid_post, got {self.patching_kind!r}")
        if self.hook not in ("hook_mlp_out", "hook_resid_post", "hook_attn_out"):
            raise ValueError(
                f"CaptureConfig.hook must be hook_mlp_out, hook_resid_post or hook_attn_out, got {self.hook!r}"
            )


@dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoders trained with SAELens on the captured activations."""

    architecture: str = "standard"
    """``standard`` (ReLU + L1), ``topk``, ``batchtopk`` or ``jumprelu`` (SAELens training SAEs)."""
    expansion: int = 2
    """Dictionary size as a multiple of d_model (the paper used 1x and 2x)."""
    l1_coefficient: float = 3.0
    """Sparsity penalty: L1 for ``standard``, L0 for ``jumprelu`` (inputs normalised to mean norm sqrt(d_model))."""
    k: int = 32
    """Active features per token for ``topk`` and ``batchtopk``."""
    training_samples: int = 150_000
    """Activations seen during training (the captured activations are cycled through)."""
    batch_size: int = 256
    """Activations per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate."""
    autocast: str = "auto"
    """Train in bfloat16 autocast (SAELens's ``autocast``; weights and optimiser stay float32): ``on``, ``off``, or
    ``auto``: on where bfloat16 products are fast (a CUDA GPU, a CPU with AMX). Measured once on the demo's SAEs: the
    same held-out explained variance in less time (no committed script repeats the measurement)."""
    early_stop_every: int = 50
    """Every this many steps, measure explained variance on validation activations held out of training
    (whole prompts holding about 5% of the training rows, at most 4096 plus one prompt); stop once it gained less than ``early_stop_tolerance`` over the
    last four checks (``training_samples`` is then an upper bound). 0 trains on every row for the full budget."""
    early_stop_tolerance: float = 0.002
    """The gain in held-out explained variance (absolute) over four checks below which training stops."""
    match_expansion: int | None = 1
    """Also train a dictionary of this size (x d_model) to measure MMCS against; None (or equal to
    ``expansion``) skips it."""
    match_threshold: float = 0.7
    """A tuned-model feature is new when no base feature's decoder cosine reaches this."""
    splice_sequences: int = 32
    """Sequences over which CE loss recovered is measured with the SAE spliced in (0 skips)."""
    pretrained: dict | None = field(default=None, metadata={"late": True})
    """Released SAEs as the IRM's basis instead of training: block -> a directory in SAELens's format, or
    ``{release: ..., id: ...}`` from SAELens's registry (needs the hub once). The layers are then chosen among
    these blocks, and one SAE serves both models (a base SAE read on the tuned model, as released SAEs are
    used). Each is checked against the pair before any stage: hook, width, the model it was trained on and
    its input normalisation. None: train SAEs on the captured activations."""
    pretrained_model_check: bool = field(default=True, metadata={"late": True})
    """Refuse a released SAE whose metadata names a model other than the pair's base or tuned model (false:
    read it anyway, e.g. an SAE of a model with another name but the same weights)."""

    def __post_init__(self) -> None:
        _positive(self, "expansion", "l1_coefficient", "training_samples", "batch_size", "lr", "k")
        if self.pretrained is not None:
            if not isinstance(self.pretrained, dict) or not self.pretrained:
                raise ValueError("SAEConfig.pretrained must map blocks to SAEs, e.g. {12: {release: gemma-scope-2b-pt-"
                                 "res-canonical, id: layer_12/width_16k/canonical}} or {12: path/to/sae}")
            for block, spec in self.pretrained.items():
                if isinstance(block, bool) or not str(block).lstrip("-").isdigit() or int(block) < 0:
                    raise ValueError(f"SAEConfig.pretrained: {block!r} is not a block index (0, 1, ...)")
                ok = isinstance(spec, str) or (isinstance(spec, dict) and set(spec) == {"release", "id"}
                                               and all(isinstance(v, str) for v in spec.values()))
                if not ok:
                    raise ValueError(f"SAEConfig.pretrained[{block}] must be a directory or {{release: ..., id: ...}}, "
                                     f"got {spec!r}")
        if self.autocast not in ("auto", "on", "off"):
            raise ValueError(f"SAEConfig.autocast must be auto, on or off, got {self.autocast!r}")
        if self.early_stop_every < 0 or self.early_stop_tolerance < 0:
            raise ValueError("SAEConfig.early_stop_every and early_stop_tolerance must be >= 0 "
                             f"(got {self.early_stop_every}, {self.early_stop_tolerance}); 0 turns early stopping off")
        if self.match_expansion is not None and self.match_expansion <= 0:
            raise ValueError(f"SAEConfig.match_expansion must be positive or null, got {self.match_expansion!r}")
        if self.splice_sequences < 0:
            raise ValueError(f"SAEConfig.splice_sequences must be >= 0, got {self.splice_sequences}")
        if self.architecture not in SAE_ARCHITECTURES:
            raise ValueError(
                f"SAEConfig.architecture must be standard, topk, batchtopk or jumprelu, got {self.architecture!r}"
            )


@dataclass(frozen=True)
class IRMConfig:
    """The IRM estimators: linear models over SAE features fitted to the per-token log-ratio."""

    estimators: tuple[str, ...] = ("ridge", "lasso", "elasticnet")
    """Behavioural SAE-feature fits to the log-ratio; the first is the primary IRM (``sae_irm``)."""
    inputs: str = "tuned"
    """Probe inputs: ``tuned`` (tuned SAE features), ``base`` (base SAE features), ``diff`` (tuned features
    minus their one-to-one matched base features) or ``raw`` (activations, no SAE)."""
    alphas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    """Ridge strengths tried by cross-validation (Lasso/ElasticNet use a grid scaled to the data)."""
    l1_ratio: float = 0.5
    """ElasticNet's L1 share."""
    min_token_count: int = 2
    """A token enters the comparison if it occurs at least this often."""
    n_shuffles: int = 5
    """Shuffled-target baseline fits (each with the IRM's chosen strength)."""
    positions: tuple[str, ...] = ("reader", "decision")
    """Where the SAE IRM reads features: ``reader`` (at t, where x_t is already in the stream; the primary IRM)
    and ``decision`` (at t-1, whose output distribution chose x_t: ``sae_irm_decision``)."""

    def __post_init__(self) -> None:
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ValueError(f"IRMConfig.alphas must be positive numbers, got {self.alphas!r}")
        if not self.estimators or any(e not in ("ridge", "lasso", "elasticnet") for e in self.estimators):
            raise ValueError(f"IRMConfig.estimators must be a non-empty list of ridge, lasso, elasticnet; "
                             f"got {self.estimators!r}")
        if self.inputs not in ("tuned", "base", "diff", "raw"):
            raise ValueError(f"IRMConfig.inputs must be tuned, base, diff or raw, got {self.inputs!r}")
        if not 0 < self.l1_ratio <= 1:
            raise ValueError(f"IRMConfig.l1_ratio must be in (0, 1], got {self.l1_ratio!r}")
        _positive(self, "min_token_count", "n_shuffles")
        if "reader" not in self.positions or any(p not in ("reader", "decision") for p in self.positions):
            raise ValueError(f"IRMConfig.positions must hold 'reader' and optionally 'decision', got {self.positions!r}")


@dataclass(frozen=True)
class CompareConfig:
    """IRM vs RM: uncertainty, RM-informed views, the control organism and feature alignment."""

    n_bootstrap: int = 1000
    """Bootstrap resamples of tokens for each tau's 95% CI (0 skips)."""
    rm_informed: bool = True
    """Also fit the RM-informed views (contrastive probe, RM regression, preference probe)."""
    n_triples: int = 200
    """Contrastive triples for the paper's probe (one forward of the tuned model per variant)."""
    triples_path: str | None = None
    """A text file (one sentence per line) to build triples from; None uses the held-out generations."""
    llm_triples: bool = False
    """Let the LLM of the ``llm`` section choose swap words that fit each sentence (offline otherwise)."""
    control: bool = True
    """Build the matched control organisms: the same graph (organism method, steps, learning rate, beta,
    batch, LoRA, prompts; their own samples, and with ``control_views: all`` their own layers, capture and SAEs)
    with a random reward in place of the RM."""
    n_controls: int = 3
    """Control organisms built, one per random-reward seed: their spread enters the primary comparison's t-test
    (k - 1 degrees of freedom), so a call needs at least 2 controls in all and has little power below 3."""
    controls: tuple[str, ...] = ()
    """Control models you name (local HF directories of the same base and tokenizer, e.g. sibling fine-tunes
    with another reward), judged beside the built ones."""
    assume_matched: bool = False
    """You vouch that the given tuned model (``pair.tuned``) was made with the ``organism.*`` recipe and that
    every named control differs from it in its reward only. Without it such controls are "not known to match"
    and the verdict makes no call."""
    control_views: str = "all"
    """What each control branch computes. ``all``: every view, as the organism (its own layers ranking, capture,
    SAEs and fits), so the SAE IRM (the explanation) is tested against the controls too. ``measured``: only the
    views that are measured, not fitted, which are all the verdict's call and the discovery list read (the
    full-vocabulary log-ratio and the plain log-ratio): the control is tuned and sampled as before and its
    samples forwarded once through both models, with no block chosen (no patching ranking), no activations, SAEs
    or fits; the SAE IRM is then reported without a control comparison. Both give the same null distribution
    for the primary statistic and discovery (they read nothing the skipped stages make); on the demo a control
    then costs 64-73 s after its training instead of about 200 s."""
    primary: str = "full_vocab_log_ratio"
    """The view the verdict's call rests on: ``full_vocab_log_ratio`` (every vocabulary token the RM values,
    not fitted: the steadier figure, benchmarks/calibration.py) or ``sae_irm`` (the SAE IRM, out-of-fold). The
    other is tested against the controls the same way and reported as the explanation."""
    alpha: float = 0.01
    """Two-sided level at which the primary comparison calls agrees/opposes (its false-call rate)."""
    n_disagreements: int = 10
    """Tokens listed where IRM and RM disagree most, each way."""
    n_alignment: int = 10
    """Features shortlisted each way in the feature alignment."""

    def __post_init__(self) -> None:
        if self.n_bootstrap < 0:
            raise ValueError(f"CompareConfig.n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if self.n_controls < 0:
            raise ValueError(f"CompareConfig.n_controls must be >= 0, got {self.n_controls!r}")
        total = self.n_controls + len(self.controls)
        if self.control and total < 2:
            raise ValueError(f"CompareConfig: {total} control organism(s) (n_controls {self.n_controls} + "
                             f"{len(self.controls)} named in controls), below the 2 that the t-test against the "
                             "controls needs; set compare.n_controls to 2 or more (3 or more for power), or "
                             "compare.control=false for a run that makes no call")
        if self.primary not in ("full_vocab_log_ratio", "sae_irm"):
            raise ValueError(f"CompareConfig.primary must be full_vocab_log_ratio or sae_irm, got {self.primary!r}")
        if self.control_views not in ("all", "measured"):
            raise ValueError(f"CompareConfig.control_views must be all or measured, got {self.control_views!r}")
        if self.control_views == "measured" and self.primary == "sae_irm":
            raise ValueError("CompareConfig: primary sae_irm is a fitted view, but control_views measured gives the "
                             "controls no SAEs or fits to test it against; set compare.control_views=all, or keep "
                             "compare.primary=full_vocab_log_ratio")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"CompareConfig.alpha must be in (0, 0.5), got {self.alpha!r}")
        _positive(self, "n_triples", "n_disagreements", "n_alignment")


@dataclass(frozen=True)
class DiscoverConfig:
    """What the tuned model learned beyond the RM: token discovery, concepts, and the IRM as a reward model."""

    alpha: float = 0.05
    """False-discovery rate (Benjamini-Hochberg) a token must pass to count as a discovery."""
    min_count: int = 2
    """Held-out occurrences a token needs to be tested (at least 2: a t-test needs a variance)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of each token's occurrences for its CI (0: no CI)."""
    n_entries: int = 15
    """Entries listed per discovery category (and residual tokens each way)."""
    pairs_path: str | None = None
    """Preference pairs (prompt, chosen, rejected) as .jsonl or .csv; None: pairs from held-out generations."""
    n_concepts: int = 5
    """SAE-feature concepts kept each way (rewarded, penalised)."""
    words: str | None = field(default=None, metadata={"late": True})
    """A text file of words you suspect the tuning rewarded (or penalised), one per line (a tab-separated line's
    first field; ``#`` comments skipped), fixed before looking: each word that is one token after a space (as
    written: case counts) enters; the list is decided as one set (the organism's mean full-vocabulary log-ratio
    over the words against each control's, a prediction t on K - 1 d.f.), and only within a list that passes is
    each word named, by the same t against the controls' values of that word, with Benjamini-Hochberg over the list
    (a family of its own, beside the open search's). Needs 2 or more controls; with 3 or more the list is also
    named on each control against the others (a pass there is false). None: no list."""

    def __post_init__(self) -> None:
        _fraction(self, "alpha")
        if self.min_count < 2:
            raise ValueError(f"DiscoverConfig.min_count must be at least 2, got {self.min_count!r}")
        if self.n_bootstrap < 0:
            raise ValueError(f"DiscoverConfig.n_bootstrap must be >= 0, got {self.n_bootstrap}")
        _positive(self, "n_entries", "n_concepts")


@dataclass(frozen=True)
class DepthConfig:
    """The depth stage: per block, how much of the log-ratio r_t the residual stream's change already explains,
    read through the written token's unembedding (the direct path) and by the logit lens; out-of-fold R^2 on
    held-out prompts. It says from which block a decision-side view reading the direct path could fit r_t."""

    enabled: bool = True
    """Run the depth stage."""
    n_prompts: int = 24
    """Held-out prompts (all their continuations of both models), drawn as the attribute stage draws its prompts
    with the same count and seed; their two halves are the cross-fitting folds."""
    lens: bool = True
    """Also score the logit lens (each model's final norm and unembedding at every block: the stage's main cost,
    a vocabulary-wide product per row, block and model)."""
    batch_size: int = 16
    """Sequences per forward."""

    def __post_init__(self) -> None:
        _positive(self, "n_prompts", "batch_size")
        if self.n_prompts < 4:
            raise ValueError(f"DepthConfig.n_prompts must be at least 4 (two halves of 2), got {self.n_prompts}")


@dataclass(frozen=True)
class LLMConfig:
    """An optional OpenAI-compatible chat endpoint (triple rewriting, the LLM feature judge)."""

    base_url: str | None = None
    """e.g. http://localhost:8000/v1 or https://api.openai.com/v1; None: no endpoint."""
    model: str = "gpt-4o-mini"
    """The endpoint's model name."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (read at call time; never stored, logged or cached)."""

    def __post_init__(self) -> None:
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            from irmprobe.llm import redact_url

            raise ValueError(f"LLMConfig.base_url must start with http:// or https://, got "
                             f"{redact_url(self.base_url)!r}")


@dataclass(frozen=True)
class ValidateConfig:
    """The interpret and ablate stages: explain the IRM's features and ablate them in the tuned model."""

    enabled: bool = True
    """Run the validation stage."""
    top_k: int = 10
    """The IRM's top features (largest positive weight) ablated and compared with the judge."""
    n_judged: int = 60
    """Features judged: the IRM's top-k, then the largest-|weight| ones, then random firing ones (half)."""
    judge: str = "offline"
    """``offline`` (relevance from the RM, no LLM), ``llm`` (the ``llm`` endpoint) or ``local`` (the base model)."""
    concept: str = "sentiment (positive or negative feelings)"
    """What the RM rewards, as the LLM judge is asked about it."""
    ablation: str = "zero"
    """``zero`` or ``mean``: the value ablated features are set to."""
    n_prompts: int = 80
    """Held-out prompts continued under each ablation."""
    samples_per_prompt: int = 2
    """Continuations per prompt and condition (same seed across conditions: paired); with ``share_half_width``, the
    most. On the demo, 80 prompts x 2 gave random feature sets' shares of the gain CI half-widths of 0.15-0.36, and
    x 8 gave 0.08-0.11 at four times the ablation's time."""
    share_half_width: float | None = field(default=None, metadata={"late": True})
    """Sample until the shares are this precise: after ``min_samples_per_prompt`` samples per prompt, and after
    each further round of one sample per prompt, sampling stops once the reward gain's 95% CI over prompts lies
    above 0 and every random set's share of the gain has a 95% CI half-width at most this
    (``samples_per_prompt`` is then the most; configs/default.yaml: 0.15). None: always ``samples_per_prompt``.
    The rule reads the intervals' widths, never the shares themselves."""
    min_samples_per_prompt: int = field(default=4, metadata={"late": True})
    """With ``share_half_width``: samples per prompt before the first check (at most ``samples_per_prompt``)."""
    max_new_tokens: int = 24
    """Length of each continuation."""
    n_random_sets: int = 4
    """Random sets of firing features drawn for each targeted set's size: each targeted set is judged against
    their distribution of shares (its Bonferroni interval wholly above their range), and with 3 or more each
    random set is judged by the same rule against the others, so the run measures the rule's false calls."""
    steer_alpha: float | None = None
    """Also steer: add this multiple of the top IRM feature's decoder direction, and of the decision-side IRM's
    top-k directions summed (None: no steering)."""
    patching_bound: bool = True
    """Also patch the base's activations at the chosen layers into the tuned model while it generates: the share
    of the reward gain the layers carry, an upper bound for ablating features there."""
    batch_size: int = 160
    """Rows per forward of the ablation's sampler: the tuned-model conditions share batches of
    ``batch_size // conditions`` (prompt, sample) slots each, and each slot draws the same random numbers in
    every condition whatever the batching, so rows stay paired; larger batches keep a GPU busier."""

    def __post_init__(self) -> None:
        _positive(self, "top_k", "n_judged", "n_prompts", "samples_per_prompt", "max_new_tokens", "batch_size",
                  "n_random_sets", "min_samples_per_prompt")
        if self.share_half_width is not None and not self.share_half_width > 0:
            raise ValueError(f"ValidateConfig.share_half_width must be > 0 or null, got {self.share_half_width}")
        if self.n_judged < self.top_k:
            raise ValueError(f"ValidateConfig.n_judged ({self.n_judged}) must be at least top_k ({self.top_k}): "
                             "the IRM's top features are always judged")
        if self.judge not in ("offline", "llm", "local"):
            raise ValueError(f"ValidateConfig.judge must be offline, llm or local, got {self.judge!r}")
        if self.ablation not in ("zero", "mean"):
            raise ValueError(f"ValidateConfig.ablation must be zero or mean, got {self.ablation!r}")


@dataclass(frozen=True)
class AttributeConfig:
    """The attribute stage: which SAE features (and SAE error terms) carry the implicit reward, by attribution
    patching with integrated gradients, exact patching and faithfulness/completeness curves."""

    enabled: bool = True
    """Run the attribute stage (needs capture.hook hook_mlp_out or hook_resid_post)."""
    n_prompts: int = 24
    """Held-out prompts used (all their continuations of both models): the first half ranks the nodes, the
    other half measures the curves. Every forward runs over them, so the cost grows linearly."""
    ig_steps: int = 8
    """Points on the path from the base's node values to the tuned's (midpoint rule)."""
    n_exact: int = 10
    """Top nodes (by |attribution|) whose effect is also measured by exact patching."""
    k_grid: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 50, 100)
    """Set sizes of the faithfulness and completeness curves."""
    n_random: int = 3
    """Random feature sets drawn at each k (the curves' control)."""
    threshold: float = 0.6
    """Faithfulness the named set must reach."""
    batch_size: int = 16
    """Sequences per forward."""
    dictionary: str = "activations"
    """The nodes' dictionary: ``activations`` (the tuned model's SAEs, the IRM's basis) or ``change``
    (dictionaries of the change: an SAE per hook point trained on tuned minus base activations at the same
    tokens, with the sae section's width and batch size; a node's base value is that of a zero change).
    The ablate stage sets the named change features, and the top features of the stage's decision-side view on
    these dictionaries, to their zero-change value while the tuned model samples, with the base model in
    lockstep, against random features of the same dictionaries with the same count at each hook point."""
    change_architecture: str = "topk"
    """The change dictionaries' architecture (``sae.architecture``'s choices). The change is dense (every token
    shifts): with ReLU + L1 at the activations' 3.0 four in ten features die, at 1.0 six in ten fire densely."""
    change_k: int = 32
    """Active features per token of a ``topk``/``batchtopk`` change dictionary."""
    change_l1_coefficient: float = 1.0
    """Sparsity penalty of a ``standard``/``jumprelu`` change dictionary (``sae.l1_coefficient``'s meaning)."""
    change_training_samples: int = 600_000
    """Samples each change dictionary trains on (no early stopping). On 2 cores change dictionaries add about a
    minute per hook point to the attribute stage (training and encoding)."""
    change_seed: int | None = field(default=None, metadata={"late": True})
    """The change dictionaries' training seed: block l's dictionary is trained with ``change_seed + l`` (None: the
    run's ``seed + l``). A set of change features is a property of one dictionary until it holds for others:
    set this to rerun the attribution (and the ablation) with dictionaries of another seed; ``seeds.checks`` redoes
    the attribution with several other seeds' dictionaries in one run."""
    spread_ranking: str = field(default="layers", metadata={"late": True})
    """How the blocks are ranked for the spread sets (the MLP outputs of the top n blocks patched together):
    ``layers`` (the layers stage's ranking: the KL each block's MLP patch removes, or its MLP weights' change;
    free) or ``reward`` (each block's MLP output patched alone on the ranking half of the prompts, ranked by its
    own share of the implicit reward; one more forward per block, about 100 s on the demo on 2 cores; the sets
    are then measured on the other half, so the ranking is not fitted to them). Like any attribute field it
    reruns what reads the attribution (the seeds checks, the ablation, the report)."""

    def __post_init__(self) -> None:
        _positive(self, "n_prompts", "ig_steps", "n_exact", "n_random", "batch_size", "change_k",
                  "change_l1_coefficient", "change_training_samples")
        if self.change_seed is not None and (isinstance(self.change_seed, bool) or int(self.change_seed) < 0):
            raise ValueError(f"AttributeConfig.change_seed must be a non-negative integer or null, "
                             f"got {self.change_seed!r}")
        if self.dictionary not in ("activations", "change"):
            raise ValueError(f"AttributeConfig.dictionary must be 'activations' or 'change', got {self.dictionary!r}")
        if self.spread_ranking not in ("layers", "reward"):
            raise ValueError(f"AttributeConfig.spread_ranking must be 'layers' or 'reward', got "
                             f"{self.spread_ranking!r}")
        if self.change_architecture not in SAE_ARCHITECTURES:
            raise ValueError(f"AttributeConfig.change_architecture must be one of {', '.join(SAE_ARCHITECTURES)}, "
                             f"got {self.change_architecture!r}")
        _fraction(self, "threshold")
        if self.n_prompts < 4:
            raise ValueError(f"AttributeConfig.n_prompts must be at least 4 (two halves of 2), got {self.n_prompts}")
        if not self.k_grid or any(int(k) < 1 for k in self.k_grid) or list(self.k_grid) != sorted(set(self.k_grid)):
            raise ValueError(f"AttributeConfig.k_grid must be increasing positive set sizes, got {self.k_grid!r}")


@dataclass(frozen=True)
class SeedsConfig:
    """The seeds stage: the attribution redone with its dictionaries trained with other seeds."""

    checks: int = 0
    """Sets of dictionaries trained with other seeds (the run's seed, or ``attribute.change_seed`` for dictionaries
    of the change, + 100 i, i = 1..n; block l's: that + l): the tuned model's SAEs as the saes stage trains them, or
    the attribute stage's dictionaries of the change (``attribute.dictionary``). Each redoes the attribution on the
    same prompts; the named set holds across dictionaries only when each of them also has a set of at most the
    named set's size reaching ``attribute.threshold`` and its features' counterparts there (closest decoder
    direction) reach it too. With no set named, the ``validate.top_k`` features of largest positive attribution
    (the set the ablate stage takes in its place) are matched instead and what their counterparts carry is
    reported beside what they carry here, with no "holds" call. Each check costs about what the attribute stage
    costs (4-7 min on the demo on 2 cores); no stage but the report reads it."""

    def __post_init__(self) -> None:
        if isinstance(self.checks, bool) or int(self.checks) < 0:
            raise ValueError(f"SeedsConfig.checks must be a non-negative integer, got {self.checks!r}")


@dataclass(frozen=True)
class ReportConfig:
    """Where results go."""

    out_dir: str = "irmprobe-runs"
    """Directory for metrics JSON files (relative to the working directory)."""
    wandb_project: str = "irmprobe"
    """W&B project name."""
    wandb_mode: str | None = None
    """``offline``, ``online`` or ``disabled``; None: the WANDB_MODE environment variable, else offline."""
    text_prompts: int = field(default=40, metadata={"late": True})
    """Held-out prompts whose continuations the report shows as coloured text (most IRM-RM disagreement first)."""
    feature_contexts: int = field(default=8, metadata={"late": True})
    """Top activating held-out contexts on each feature card."""

    def __post_init__(self) -> None:
        for name in ("text_prompts", "feature_contexts"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ReportConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.wandb_mode not in (None, "offline", "online", "disabled"):
            raise ValueError(
                f"ReportConfig.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}"
            )


@dataclass(frozen=True)
class Runtime:
    """Where and how models run: what every stage that loads a model needs, and nothing more."""

    device: str = "cpu"
    """Torch device."""
    dtype: str = "float32"
    """Weights dtype."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own code."""
    device_map: str | None = None
    """Split each model across devices with accelerate (see ``PairConfig.device_map``)."""
    max_memory: dict | None = None
    """With ``device_map``: accelerate's budget per device."""

    @classmethod
    def of(cls, pair: PairConfig) -> Runtime:
        return cls(pair.device, pair.dtype, pair.trust_remote_code, pair.device_map, pair.max_memory)


@dataclass(frozen=True)
class RunConfig:
    """A whole analysis."""

    pair: PairConfig = field(default_factory=PairConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    organism: OrganismConfig = field(default_factory=OrganismConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    irm: IRMConfig = field(default_factory=IRMConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    attribute: AttributeConfig = field(default_factory=AttributeConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    seed: int = 0
    """Seed for every stage."""

    def __post_init__(self) -> None:
        if self.seeds.checks and self.attribute.dictionary == "activations" and self.sae.pretrained:
            raise ValueError("seeds.checks retrains the attribution's dictionaries with other seeds, but they are "
                             "released SAEs (sae.pretrained), which have no seed to vary: set attribute.dictionary: "
                             "change, or leave seeds.checks at 0")
        if self.reward.tuned_against is not None and (self.pair.tuned or self.pair.null):
            raise ValueError("reward.tuned_against names what irmprobe tunes the organism against, but pair.tuned "
                             "(or pair.null) is set, so nothing is tuned: drop one of them")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Build a config from nested dicts; unknown keys raise ValueError naming them."""
        return _from_dict(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """Build a config from a YAML file; a file that is not YAML raises one line with its line number."""
        data = _read_yaml(Path(path)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a mapping of sections")
        return cls.from_dict(data)


def _from_dict(cls: type, data: dict, where: str) -> Any:
    """Build ``cls`` from a mapping, checking every value against its field's annotation.

    Raises:
        ValueError: naming the field (``config.section.field``), the value and the expected type.
    """
    if data is None and where != "config":
        data = {}  # a YAML section whose lines are all commented out
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _checked(value, hints[name], f"{where}.{name}")
            if cls is PairConfig and name == "device":
                _check_device(kwargs[name], f"{where}.{name}")
    return cls(**kwargs)


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a config dataclass (read from its source)."""
    return dict(_field_docs(cls))


@functools.cache  # inspect.getsource parses the whole module per call: each subcommand's help reads every section
def _field_docs(cls: type) -> dict[str, str]:
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_reference() -> str:
    """Markdown listing every config section and field with its default and meaning."""
    lines = ["# Configuration reference", "",
             "Every field of `RunConfig` (YAML sections, or `--set section.field=value`).",
             "Generated from `irmprobe/config.py` by `irmprobe.config.config_reference()`.", ""]
    top = RunConfig()
    for f in fields(RunConfig):
        value = getattr(top, f.name)
        if not is_dataclass(value):
            lines += [f"## `{f.name}`", "", f"Default `{value!r}`. {field_docs(RunConfig).get(f.name, '')}", ""]
            continue
        lines += [f"## `{f.name}`", "", (type(value).__doc__ or "").strip(), "",
                  "| field | default | meaning |", "| --- | --- | --- |"]
        docs = field_docs(type(value))
        for sub in fields(value):
            lines.append(f"| `{sub.name}` | `{getattr(value, sub.name)!r}` | {docs.get(sub.name, '')} |")
        lines.append("")
    return "\n".join(lines)


def _expected(hint: Any) -> str:
    """A field annotation as a user reads it: ``int``, ``float or null``, ``a list of str``."""
    if get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return " or ".join(_expected(a) for a in inner) + " or null"
    if get_origin(hint) is tuple:
        return f"a list of {_expected(get_args(hint)[0])}"
    if hint is bool:
        return "bool (true or false)"
    if hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _checked(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it fits the annotation ``hint`` (converted where that is safe), else ValueError.

    A float field takes an int, and a number written as text (YAML reads ``1e-4`` as a string); a
    str field takes an int (``--set reward.label=1``); a tuple field takes a list.
    """
    wrong = ValueError(f"{where} must be {_expected(hint)}, got {value!r} ({type(value).__name__})")
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            try:
                return _checked(value, candidate, where)
            except ValueError:
                pass
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        return tuple(_checked(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise wrong
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong
        return value
    if hint is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise wrong from None
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise wrong
        if not math.isfinite(number):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise wrong
        return value
    return tuple(value) if isinstance(value, list) else value  # an annotation not checked here


_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


def _check_device(value: str, where: str) -> None:
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"{where} must be cpu, cuda, cuda:N (e.g. cuda:1) or mps, got {value!r}")


def _read_yaml(path: Path) -> Any:
    """The parsed YAML of ``path``; any problem is one ValueError line naming the file (and line)."""
    import yaml

    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (line {line}); a config is a YAML text file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark is not None:
            problem += f" ({context} at line {cmark.line + 1})"
        raise ValueError(f"{path}{line}: not valid YAML: {problem}") from None

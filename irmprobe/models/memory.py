"""A pre-flight memory plan: what each phase of a run holds on its device, from the models' configs alone.

Nothing is loaded: parameter counts come from instantiating each architecture on the ``meta`` device
(accelerate's ``init_empty_weights``), so an 8B model is counted exactly in a second. The plan has two
phases, and the run's peak is the larger:

- **tuning** (an organism or a control, one at a time): the policy's weights, its trainable
  parameters' gradients and AdamW state (two float32 moments), the reference model a full fine-tune
  keeps for the KL term (LoRA needs none: TRL disables the adapters), the activations kept for the
  backward pass, the generation KV cache, the logits, and the RM when it is a neural model. The
  pair loaded by earlier stages stays resident (the runner keeps it), so it is added too.
- **analysis**: both models of the pair at ``pair.dtype``, the RM, and the largest forward batch
  (the capture's logits, both models).

Activations per block and token follow Korthikanti et al. (2022) without attention scores, ``34 h * bytes/2``
without checkpointing, ``2 h * bytes/2`` with it (one block recomputed at a time). The estimate is checked against
measured peaks by ``benchmarks/memory_plan.py``; the number of float32 logit copies held at a step's peak (4)
was read off its first stand-in, so its second stand-in (another width, depth and vocabulary) is the check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GIB = 1024 ** 3

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: parameter count and dimensions."""

    params: int
    d_model: int
    n_layers: int
    n_heads: int
    kv_dim: int
    vocab: int
    linear_shapes: tuple = ()
    """(in, out) of every Linear inside the blocks: what LoRA adapts (``target_modules="all-linear"``)."""


def model_shape(spec_or_config, *, classifier: bool = False, trust_remote_code: bool = False) -> Shape:
    """The :class:`Shape` of a model directory, hub id or ``transformers`` config, counted on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

    if isinstance(spec_or_config, PretrainedConfig):
        config = spec_or_config
    else:
        from irmprobe.models.loading import resolve_spec

        try:
            config = AutoConfig.from_pretrained(resolve_spec(str(spec_or_config)), trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise ValueError(f"could not read the config of {spec_or_config!r} to plan memory ({exc}); pass a local "
                             "model directory, or set pair.memory_check: false") from exc
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with init_empty_weights():
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # tied embeddings are one parameter (from_config on meta leaves them untied)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d_model = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd"))
    n_heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head"))
    n_kv = int(getattr(text, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(text, "head_dim", None) or d_model // n_heads)
    params = sum(p.numel() for p in model.parameters())
    linears = tuple((m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and any(k in name for k in (".layers.", ".h.", ".blocks.")))
    n_layers = int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer"))
    return Shape(int(params), d_model, n_layers, n_heads, n_kv * head_dim, int(text.vocab_size), linears)


@dataclass(frozen=True)
class Phase:
    name: str
    items: dict
    """What is held -> bytes."""

    @property
    def total(self) -> int:
        return int(sum(self.items.values()))


@dataclass(frozen=True)
class MemoryPlan:
    phases: list
    capacity: int | None
    """Bytes the device(s) offer; None when unknown."""
    device: str
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak.total <= self.capacity

    def lines(self) -> list[str]:
        out = []
        for phase in self.phases:
            out.append(f"{phase.name:<9} {phase.total / GIB:8.2f} GiB  = " + ", ".join(
                f"{k} {v / GIB:.2f}" for k, v in phase.items.items() if v))
        cap = "unknown" if self.capacity is None else f"{self.capacity / GIB:.1f} GiB"
        verdict = "fits" if self.fits else f"does NOT fit (short by {(self.peak.total - self.capacity) / GIB:.1f} GiB)"
        out.append(f"peak      {self.peak.total / GIB:8.2f} GiB ({self.peak.name}) on {self.device} ({cap}): {verdict}")
        return out + self.notes


def lora_params(shape: Shape, rank: int) -> int:
    """Trainable parameters of LoRA of rank ``rank`` on every linear layer of the blocks."""
    return int(sum(rank * (i + o) for i, o in shape.linear_shapes))


def activations(shape: Shape, batch: int, seq: int, act_bytes: int, checkpointing: bool) -> int:
    """Bytes of activations kept for the backward pass of one step: Korthikanti et al. (2022)'s ``34 s b h`` 16-bit
    values per block without the ``5 a s^2 b`` attention scores (SDPA and flash attention keep none); with
    checkpointing each block keeps its input (``2 s b h``) and one block is recomputed at a time."""
    full_block = seq * batch * shape.d_model * 34
    kept = (seq * batch * shape.d_model * 2 * shape.n_layers + full_block) if checkpointing else \
        full_block * shape.n_layers
    return int(kept * act_bytes / 2)


def tuning_phase(shape: Shape, oc, *, prompt_tokens: int, bf16: bool, rm_bytes: int, resident: int) -> Phase:
    """One organism or control being tuned (``oc``: the organism config)."""
    lora = oc.lora_rank > 0
    weight_bytes = 2 if (bf16 and lora) else 4
    trainable = lora_params(shape, oc.lora_rank) if lora else shape.params
    batch = oc.prompts_per_step * (oc.generations_per_prompt if oc.method != "dpo" else 2)
    seq = prompt_tokens + oc.max_new_tokens
    act_bytes = 2 if bf16 else 4
    items = {
        "policy weights": shape.params * weight_bytes,
        "gradients": trainable * 4,
        "AdamW state": trainable * 8,
        "reference model": 0 if (lora or oc.beta == 0) else shape.params * weight_bytes,
        "activations": activations(shape, batch, seq, act_bytes, oc.gradient_checkpointing),
        # float32 logits of the completion tokens only (TRL asks for logits_to_keep): the forward's, the softmax
        # temporary, the gradient and the reference's, held together at the step's peak.
        "logits": batch * (oc.max_new_tokens + 1) * shape.vocab * 4 * 4,
        "KV cache": 2 * shape.n_layers * batch * seq * shape.kv_dim * act_bytes,
        "RM": rm_bytes,
        "pair kept from earlier stages": resident,
    }
    return Phase("tuning", items)


def analysis_phase(base: Shape, tuned: Shape, *, dtype: str, rm_bytes: int, batch: int, seq: int) -> Phase:
    b = _BYTES[dtype]
    items = {"base weights": base.params * b, "tuned weights": tuned.params * b, "RM": rm_bytes,
             "capture logits": 2 * batch * seq * base.vocab * 4 * 2}
    return Phase("analysis", items)


def device_capacity(device: str, device_map: str | None = None) -> int | None:
    """Bytes available: a CUDA device's total memory (every visible GPU's with a ``device_map``), or the
    machine's physical memory for the CPU; None when it cannot be read."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        if device_map:
            return int(sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())))
        index = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def plan(config, *, base: Shape | None = None, tuned: Shape | None = None, rm: Shape | None = None,
         capacity: int | None = None, prompt_tokens: int = 64) -> MemoryPlan:
    """The memory plan of a run (``config``: a :class:`~irmprobe.config.RunConfig`).

    ``base``/``tuned``/``rm`` default to the shapes of the models the config names (the RM only for a
    classifier RM); ``capacity`` defaults to :func:`device_capacity`. ``prompt_tokens`` is the prompt length
    assumed for tuning and capture.
    """
    from irmprobe.devices import bf16_precision

    pc, oc = config.pair, config.organism
    base = base or model_shape(pc.base, trust_remote_code=pc.trust_remote_code)
    tuned = tuned or (model_shape(pc.tuned, trust_remote_code=pc.trust_remote_code) if pc.tuned else base)
    if rm is None and config.reward.kind == "classifier":
        rm = model_shape(config.reward.model, classifier=True)
    rm_bytes = rm.params * _BYTES[pc.dtype] if rm is not None else 0
    if capacity is None:
        capacity = device_capacity(pc.device, pc.device_map)
    bf16 = bf16_precision(oc.precision, pc.device)
    analysis = analysis_phase(base, tuned, dtype=pc.dtype, rm_bytes=rm_bytes, batch=config.capture.batch_size,
                              seq=prompt_tokens + config.samples.max_new_tokens)
    phases, notes = [], []
    tunes = pc.tuned is None and not pc.null or (config.compare.control and config.compare.n_controls > 0
                                                  and not pc.null)
    if tunes:
        resident = analysis.items["base weights"] + analysis.items["tuned weights"]
        phases.append(tuning_phase(base, oc, prompt_tokens=prompt_tokens, bf16=bf16, rm_bytes=rm_bytes,
                                   resident=resident))
        lora = f"LoRA rank {oc.lora_rank}" if oc.lora_rank else "full fine-tune"
        notes.append(f"tuning: {lora}, {'bfloat16' if bf16 else 'float32'}, gradient checkpointing "
                     f"{'on' if oc.gradient_checkpointing else 'off'}")
    phases.append(analysis)
    return MemoryPlan(phases, capacity, pc.device, notes)


def check_plan(config) -> MemoryPlan:
    """Refuse a run whose memory plan does not fit its device(s), before any stage.

    Raises:
        ValueError: the plan's peak exceeds the device's memory; the message holds the plan's table.
    """
    p = plan(config)
    if not p.fits:
        raise ValueError("the run will not fit in memory:\n  " + "\n  ".join(p.lines()) + "\nUse LoRA "
                         "(organism.lora_rank), organism.precision: bfloat16, organism.gradient_checkpointing, "
                         "pair.dtype: bfloat16, or a device_map over more devices; pair.memory_check: false skips "
                         "this check")
    return p

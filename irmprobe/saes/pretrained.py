"""Released SAEs as the IRM's basis (``sae.pretrained``): loaded through SAELens and checked against the pair.

A released SAE means something only on the tensor it was trained on. Before any stage runs, each
one is loaded and checked: the hook it read (``blocks.{L}.{capture.hook}``), its input width
(the pair's ``d_model``), the model it was trained on (its metadata's ``model_name`` against the
pair's base and tuned model) and its input normalisation (irmprobe feeds raw activations, so an
SAE that expects them rescaled by a factor it does not carry would read the wrong scale).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def blocks(sc) -> list[int]:
    """The blocks ``sae.pretrained`` names, ascending."""
    return sorted(int(b) for b in (sc.pretrained or {}))


def spec_of(sc, block: int):
    """The ``sae.pretrained`` entry of ``block`` (keys may be ints or strings)."""
    for key, spec in sc.pretrained.items():
        if int(key) == block:
            return spec
    raise KeyError(block)


def describe(spec) -> str:
    return spec if isinstance(spec, str) else f"{spec['release']}/{spec['id']}"


def fingerprint(spec) -> str:
    """What identifies a released SAE in a cache key: the release and id, or a directory's files (size and
    the first and last MiB of each, so a replaced SAE gets fresh caches without hashing it whole)."""
    if not isinstance(spec, str):
        return describe(spec)
    digest = hashlib.sha256()
    for f in sorted(Path(spec).expanduser().iterdir()):
        if f.is_file():
            size = f.stat().st_size
            digest.update(f"{f.name}:{size}".encode())
            with f.open("rb") as fh:
                digest.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def load(spec, *, device: str = "cpu"):
    """The SAELens SAE a ``sae.pretrained`` entry names.

    Raises:
        ValueError: it cannot be loaded (a missing directory, an unknown release, the hub unreachable).
    """
    from sae_lens import SAE

    where = f"directory {spec!r}" if isinstance(spec, str) else f"release {spec['release']!r}, id {spec['id']!r}"
    try:
        if isinstance(spec, str):
            if not (Path(spec).expanduser() / "cfg.json").is_file():
                raise FileNotFoundError(f"{spec} holds no cfg.json (an SAE saved by SAELens's save_model)")
            return SAE.load_from_disk(str(Path(spec).expanduser()), device=device)
        return SAE.from_pretrained(spec["release"], spec["id"], device=device)
    except (OSError, FileNotFoundError, ValueError, KeyError) as exc:
        raise ValueError(f"sae.pretrained: could not load the SAE from {where}: {exc}. Offline, download it where "
                         "the hub is reachable and name its directory") from exc


def _short(name: str | None) -> str:
    """``google/gemma-2-2b`` and ``gemma-2-2b`` and ``/models/gemma-2-2b/`` are one model name."""
    return Path(str(name).rstrip("/")).name.lower() if name else ""


def check(sae, *, where: str, hook_name: str, d_model: int, model_names: set[str], model_check: bool = True) -> None:
    """Refuse an SAE that would not read this pair's tensor as it was trained to.

    Raises:
        ValueError: another hook, another width, another model (with ``model_check``), or an input
            normalisation irmprobe does not apply.
    """
    cfg = sae.cfg
    if cfg.d_in != d_model:
        raise ValueError(f"{where} reads {cfg.d_in}-dimensional inputs but the pair's d_model is {d_model}: it was "
                         "trained on another model or hook")
    trained_on = getattr(cfg.metadata, "hook_name", None)
    if trained_on is not None and trained_on != hook_name:
        raise ValueError(f"{where} was trained on {trained_on!r}, not {hook_name!r}: name the SAE of this block and "
                         "hook, or set capture.hook to the one it read")
    model = getattr(cfg.metadata, "model_name", None)
    names = {_short(n) for n in model_names if n}
    if model_check and model and _short(model) not in names:
        raise ValueError(f"{where} was trained on model {model!r}, and the pair is {sorted(names)}: its features "
                         "would mean nothing here. Name the SAE of this model, or set sae.pretrained_model_check: "
                         "false if it is the same model under another name")
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(f"{where} expects its inputs normalised ({norm!r}) and carries no folded scaling factor; "
                         "irmprobe reads raw activations. Fold the normalisation into the weights (SAELens: "
                         "fold_activation_norm_scaling_factor) and save it, or pick an SAE without one")


def model_shape(spec: str, trust_remote_code: bool = False) -> tuple[int, int, set[str]]:
    """(d_model, number of blocks, names) of a model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from irmprobe.models.loading import resolve_spec

    config = AutoConfig.from_pretrained(resolve_spec(spec), trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d_model = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model")
    n_blocks = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    return int(d_model), int(n_blocks), {spec, getattr(config, "_name_or_path", "") or ""}


def check_config(config) -> None:
    """Every ``sae.pretrained`` entry loaded and checked against the pair, before any stage runs.

    Raises:
        ValueError: a block the model does not have, an SAE that cannot be loaded, or one that fails :func:`check`.
    """
    sc = config.sae
    if not sc.pretrained:
        return
    d_model, n_blocks, names = model_shape(config.pair.base, config.pair.trust_remote_code)
    if config.pair.tuned:
        names |= model_shape(config.pair.tuned, config.pair.trust_remote_code)[2]
    for block in blocks(sc):
        if block >= n_blocks:
            raise ValueError(f"sae.pretrained names block {block}, but {config.pair.base!r} has {n_blocks} blocks "
                             f"(0..{n_blocks - 1})")
        spec = spec_of(sc, block)
        check(load(spec), where=f"sae.pretrained[{block}] ({describe(spec)})",
              hook_name=f"blocks.{block}.{config.capture.hook}", d_model=d_model, model_names=names,
              model_check=sc.pretrained_model_check)

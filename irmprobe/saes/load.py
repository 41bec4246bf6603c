"""Saving and loading SAEs (safetensors through SAELens), and released SAEs from SAELens's registry."""

from __future__ import annotations

import logging
from pathlib import Path

from sae_lens import SAE

from irmprobe.cache import atomic_dir, write_json
from irmprobe.saes.evaluate import SAEMetrics

log = logging.getLogger(__name__)


def save_sae(sae: SAE, directory: Path, metrics: SAEMetrics | None = None) -> None:
    """Save in SAELens format (``SAE.load_from_disk`` reads it), with our metrics if given."""
    with atomic_dir(Path(directory)) as tmp:
        # Training SAEs save their inference form (BatchTopK becomes JumpReLU, for example), which
        # is what SAE.load_from_disk reads.
        save = getattr(sae, "save_inference_model", None) or sae.save_model
        save(tmp)
        if metrics is not None:
            write_json(tmp / "irmprobe_metrics.json", metrics)


def load_sae(directory: Path, device: str = "cpu") -> SAE:
    return SAE.load_from_disk(str(directory), device=device)


def read_sae(source: str, *, sae_id: str | None = None, device: str = "cpu") -> SAE:
    """A published SAELens SAE, by release and id (needs the hub) or from a directory on disk; unchecked.

    Raises:
        ValueError: it cannot be loaded (a directory without ``cfg.json``, an unknown release, no hub).
    """
    where = f"release {source!r}, id {sae_id!r}" if sae_id else f"directory {source!r}"
    try:
        if sae_id is None:
            if not (Path(source).expanduser() / "cfg.json").is_file():
                raise FileNotFoundError(f"{source} holds no cfg.json (an SAE saved by SAELens's save_model)")
            return SAE.load_from_disk(str(Path(source).expanduser()), device=device)
        return SAE.from_pretrained(source, sae_id, device=device)
    except (OSError, FileNotFoundError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load the SAE from {where}: {exc}. Offline, download it where the hub "
                         "is reachable and pass its directory") from exc


def _short(name: str | None) -> str:
    """``google/gemma-2-2b`` and ``gemma-2-2b`` and ``/models/gemma-2-2b/`` are one model name."""
    return Path(str(name).rstrip("/")).name.lower() if name else ""


def check_sae(sae: SAE, *, where: str, hook_name: str, d_model: int, model_names=(), model_check: bool = True) -> None:
    """Refuse an SAE that would not read this model's tensor as it was trained to.

    Raises:
        ValueError: another width or hook; with ``model_check`` and ``model_names``, a ``model_name`` in its
            metadata that is none of them; an input normalisation irmprobe does not apply (it reads raw
            activations, so an SAE expecting them rescaled by a factor it does not carry reads the wrong scale).
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
    if model_check and model and names and _short(model) not in names:
        raise ValueError(f"{where} was trained on model {model!r}, and the pair is {sorted(names)}: its features "
                         "would mean nothing here. Name the SAE of this model, or set sae.pretrained_model_check: "
                         "false if it is the same model under another name")
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(f"{where} expects its inputs normalised ({norm!r}) and carries no folded scaling factor; "
                         "irmprobe reads raw activations. Fold the normalisation into the weights (SAELens: "
                         "fold_activation_norm_scaling_factor) and save it, or pick an SAE without one")


def load_pretrained_sae(source: str, *, hook_name: str, d_model: int, sae_id: str | None = None,
                        device: str = "cpu", where: str | None = None, model_names=(),
                        model_check: bool = True) -> SAE:
    """:func:`read_sae`, then :func:`check_sae` against the model it is meant for.

    Raises:
        ValueError: it cannot be loaded, or it does not fit the model (see :func:`check_sae`).
    """
    sae = read_sae(source, sae_id=sae_id, device=device)
    check_sae(sae, where=where or f"SAE {source}", hook_name=hook_name, d_model=d_model, model_names=model_names,
              model_check=model_check)
    return sae

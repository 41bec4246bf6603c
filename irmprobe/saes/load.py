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


def load_pretrained_sae(source: str, *, hook_name: str, d_model: int, sae_id: str | None = None,
                        device: str = "cpu") -> SAE:
    """A published SAELens SAE, by release and id (needs the hub) or from a directory on disk.

    Raises:
        ValueError: it cannot be loaded, or it was trained on another hook or width than the
            model it is meant for (so its features would mean nothing there).
    """
    try:
        if sae_id is None:
            sae = SAE.load_from_disk(source, device=device)
        else:
            sae = SAE.from_pretrained(source, sae_id, device=device)
    except (OSError, FileNotFoundError, ValueError, KeyError) as exc:
        where = f"release {source!r}, id {sae_id!r}" if sae_id else f"directory {source!r}"
        raise ValueError(f"could not load the SAE from {where}: {exc}. Offline, download it where the hub "
                         "is reachable and pass its directory") from exc
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE {source} reads {sae.cfg.d_in}-dimensional inputs but the model's d_model is {d_model}")
    trained_on = sae.cfg.metadata.hook_name
    if trained_on is not None and trained_on != hook_name:
        raise ValueError(f"SAE {source} was trained on {trained_on!r}, not {hook_name!r}; "
                         "pick the SAE for this hook or capture that hook instead")
    return sae

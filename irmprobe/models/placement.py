"""Where a model's weights live: ``device_map`` strategies, memory caps, offloaded modules, the input device."""

from __future__ import annotations

import json
import tempfile

import torch

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


def placement_kwargs(device_map, max_memory) -> dict:
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


def module_device(module) -> torch.device:
    """Where a module runs: its weights' device, or, for weights accelerate offloaded (on the meta device between
    calls), its hook's execution device (the CPU when it names none)."""
    device = next(module.parameters()).device
    if device.type == "meta":
        hooked = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if hooked is None:
            return torch.device("cpu")
        device = torch.device(f"cuda:{hooked}" if isinstance(hooked, int) else hooked)
    return device


def input_device(model) -> torch.device:
    """Where a model's input ids go: the device of its input embeddings (its first device when sharded)."""
    return module_device(model.get_input_embeddings())

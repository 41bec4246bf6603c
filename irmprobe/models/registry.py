"""Named model pairs, reward models and organisms, read once from ``data/pairs.yaml``."""

from __future__ import annotations

_SECTIONS = ("pair", "reward", "organism", "capture", "sae", "compare", "samples")
_FAMILIES = ("gpt2", "gpt_neo", "gpt_neox", "llama", "qwen2", "gemma2")
"""The architecture families whose hook points are tested on tiny stand-ins (tests/unit/test_families.py)."""


def registry(text: str | None = None) -> dict[str, dict]:
    """The pair registry (``irmprobe/data/pairs.yaml``, or ``text``): name -> entry.

    Raises:
        ValueError: an entry lacks a name or a base, names an unknown section, or a name repeats.
    """
    from importlib import resources

    import yaml

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
        unknown = set(entry) - {"name", "description", "family", "memory", *_SECTIONS}
        if unknown:
            raise ValueError(f"pair registry entry {name!r}: unknown keys {sorted(unknown)}")
        if not entry.get("pair", {}).get("base"):
            raise ValueError(f"pair registry entry {name!r} has no pair.base")
        if entry.get("family") not in _FAMILIES:
            raise ValueError(f"pair registry entry {name!r}: family must be one of {list(_FAMILIES)} (the stand-in "
                             f"its config is tested on), got {entry.get('family')!r}")
        out[name] = entry
    return out


def registry_entry(name: str) -> dict:
    """Config sections (pair, reward, organism, capture, sae, compare, samples) of a named registry entry."""
    entries = registry()
    if name not in entries:
        raise ValueError(f"no pair named {name!r} in the registry; known: {sorted(entries)}")
    return {k: dict(v) for k, v in entries[name].items() if k in _SECTIONS}

"""Released SAEs as the IRM's basis (``sae.pretrained``): loaded through SAELens and checked against the pair.

A released SAE means something only on the tensor it was trained on. Before any stage runs, each
one is loaded and checked (:func:`irmprobe.saes.load.check_sae`): the hook it read
(``blocks.{L}.{capture.hook}``), its input width (the pair's ``d_model``), the model it was trained on
(its metadata's ``model_name`` against the pair's base and tuned model) and its input normalisation.
"""

from __future__ import annotations


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
    """What identifies a released SAE in a cache key: the release and id, or the directory's files
    (:func:`irmprobe.models.loading.fingerprint`: a replaced SAE gets fresh caches)."""
    from irmprobe.models.loading import fingerprint as files_fingerprint

    return describe(spec) if not isinstance(spec, str) else files_fingerprint(spec)


def load(spec, *, device: str = "cpu"):
    """The SAELens SAE a ``sae.pretrained`` entry names (unchecked: :func:`check_config` checked it)."""
    from irmprobe.saes.load import read_sae

    if isinstance(spec, str):
        return read_sae(spec, device=device)
    return read_sae(spec["release"], sae_id=spec["id"], device=device)


def check_config(config) -> None:
    """Every ``sae.pretrained`` entry loaded and checked against the pair, before any stage runs.

    Raises:
        ValueError: a block the model does not have, an SAE that cannot be loaded, or one that fails
            :func:`irmprobe.saes.load.check_sae`.
    """
    sc = config.sae
    if not sc.pretrained:
        return
    from irmprobe.models.memory import model_shape
    from irmprobe.saes.load import check_sae

    shape = model_shape(config.pair.base, trust_remote_code=config.pair.trust_remote_code)
    d_model, n_blocks = shape.d_model, shape.n_layers
    names = {config.pair.base} | ({config.pair.tuned} if config.pair.tuned else set())
    for block in blocks(sc):
        if block >= n_blocks:
            raise ValueError(f"sae.pretrained names block {block}, but {config.pair.base!r} has {n_blocks} blocks "
                             f"(0..{n_blocks - 1})")
        spec = spec_of(sc, block)
        check_sae(load(spec), where=f"sae.pretrained[{block}] ({describe(spec)})",
                  hook_name=f"blocks.{block}.{config.capture.hook}", d_model=d_model, model_names=names,
                  model_check=sc.pretrained_model_check)

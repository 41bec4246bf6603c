"""irmprobe: measure how far an RLHF-tuned model's implicit reward model (IRM) diverges from
the reward model (RM) it was tuned against.

Public names are imported lazily, so ``import irmprobe`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "irmprobe.config",
    "run": "irmprobe.api",
    "RunResult": "irmprobe.api",
    "FittedIRM": "irmprobe.api",
    "STAGES": "irmprobe.pipeline.stages",
    "RunMetrics": "irmprobe.results",
    "TextRM": "irmprobe.rewards",
    "ClassifierRM": "irmprobe.rewards",
    "RandomRM": "irmprobe.rewards",
    "reward_model": "irmprobe.rewards",
    "ContrastiveProbe": "irmprobe.irm",
    "fit_irm": "irmprobe.irm",
    "preference_probe": "irmprobe.irm",
    "build_triples": "irmprobe.triples",
    "analyse": "irmprobe.views",
    "probe_inputs": "irmprobe.views",
    "compare_view": "irmprobe.compare",
    "feature_alignment": "irmprobe.compare",
    "against_control": "irmprobe.compare",
    "feature_evidence": "irmprobe.evals.autointerp",
    "OfflineJudge": "irmprobe.evals.autointerp",
    "LLMJudge": "irmprobe.evals.autointerp",
    "FeatureSet": "irmprobe.evals.ablation",
    "ablation_table": "irmprobe.evals.ablation",
    "ChatClient": "irmprobe.llm",
    "write_html": "irmprobe.reporting",
    "ModelPair": "irmprobe.pairs",
    "load_pair": "irmprobe.pairs",
    "load_model": "irmprobe.pairs",
    "layer_divergence": "irmprobe.pairs",
    "LexiconRM": "irmprobe.rewards",
    "make_organism": "irmprobe.organisms",
    "capture_pair": "irmprobe.capture",
    "train_sae": "irmprobe.features",
    "LinearIRM": "irmprobe.irm",
    "token_map": "irmprobe.irm",
    "agreement": "irmprobe.compare",
    "kendall_tau": "irmprobe.compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'irmprobe' has no attribute {name!r}")

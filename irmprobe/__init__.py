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
    "STAGES": "irmprobe.pipeline.graph",
    "RunMetrics": "irmprobe.results",
    "TextRM": "irmprobe.models.rewards",
    "ClassifierRM": "irmprobe.models.rewards",
    "RandomRM": "irmprobe.models.rewards",
    "reward_model": "irmprobe.models.rewards",
    "ContrastiveProbe": "irmprobe.irm.estimators",
    "fit_irm": "irmprobe.irm.crossfit",
    "preference_probe": "irmprobe.irm.crossfit",
    "build_triples": "irmprobe.irm.triples",
    "analyse": "irmprobe.analysis.views",
    "probe_inputs": "irmprobe.analysis.views",
    "compare_view": "irmprobe.analysis.agreement",
    "feature_alignment": "irmprobe.analysis.agreement",
    "against_control": "irmprobe.analysis.agreement",
    "feature_evidence": "irmprobe.validation.autointerp",
    "OfflineJudge": "irmprobe.validation.autointerp",
    "LLMJudge": "irmprobe.validation.autointerp",
    "FeatureSet": "irmprobe.validation.ablation",
    "ablation_table": "irmprobe.validation.ablation",
    "ChatClient": "irmprobe.llm",
    "write_html": "irmprobe.reporting.html",
    "ModelPair": "irmprobe.models.loading",
    "load_pair": "irmprobe.models.loading",
    "load_model": "irmprobe.models.loading",
    "layer_divergence": "irmprobe.models.divergence",
    "LexiconRM": "irmprobe.models.rewards",
    "make_organism": "irmprobe.organisms.tuning",
    "capture_pair": "irmprobe.activations.capture",
    "train_sae": "irmprobe.saes.train",
    "LinearIRM": "irmprobe.irm.estimators",
    "token_map": "irmprobe.irm.crossfit",
    "agreement": "irmprobe.analysis.agreement",
    "kendall_tau": "irmprobe.analysis.agreement",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'irmprobe' has no attribute {name!r}")

"""Validation of an IRM: feature interpretation (``autointerp``) and causal ablation (``ablation``)."""

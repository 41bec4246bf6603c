"""IRM estimators: linear models of the per-token log-ratio over features, the contrastive and preference
probes, cross-fitting by group, token -> value maps, contrastive triples, and ridge on a torch device.
"""

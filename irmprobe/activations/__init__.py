"""Activations: held-out continuations of both models (samples), paired capture through TransformerLens
hooks and its disk store, and activation patching between the two models.
"""

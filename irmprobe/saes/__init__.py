"""Sparse autoencoders via SAELens: train, save and load (released ones too), evaluate, splice into the model.
"""

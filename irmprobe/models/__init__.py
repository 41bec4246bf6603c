"""Models: loading a spec into a checked Hugging Face model and the (base, tuned) pair, weight placement,
the registry of named pairs, reward models, and how far the tuning moved each block's weights.
"""

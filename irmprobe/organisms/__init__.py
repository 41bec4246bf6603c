"""Organisms: a base model tuned against a known reward with TRL, and the report on what the tuning did
(reward and KL on held-out continuations).
"""

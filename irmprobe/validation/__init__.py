"""Validation: explain and label the features the IRM relies on (auto-interp), and ablate them in the
tuned model while it samples.
"""

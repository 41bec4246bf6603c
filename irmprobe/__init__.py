"""irmprobe: measure how far an RLHF-tuned model's implicit reward model (IRM) diverges from
the reward model (RM) it was tuned against."""

__version__ = "0.1.0"

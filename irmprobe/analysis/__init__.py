"""Analysis: the IRM views of one capture and their agreement with the RM, what the tuned model learned
beyond the RM (discovery), and the verdict.
"""

"""The stages of the graph, one module each: what a stage reads and needs, and its glue between the
domain packages (the runner in :mod:`irmprobe.pipeline.runner` orders and caches them).
"""

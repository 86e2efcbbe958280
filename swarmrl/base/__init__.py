"""The bottom layer: the config tree, model loading and generation, logging and metrics.

Everything else imports from here; this package imports nothing of swarmrl's above it.
"""

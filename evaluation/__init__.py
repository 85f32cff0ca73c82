"""Evaluate aligned checkpoints on held-out prompts and write a report (`python -m evaluation`)."""

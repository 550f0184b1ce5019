"""Structured pruning: whole feed-forward neurons and attention heads (`units`, `selection`), and `shrink`, which
removes them physically so that the result is a smaller standard transformers model."""

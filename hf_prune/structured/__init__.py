"""Structured pruning: whole feed-forward neurons and attention heads (`units`, `selection`), `shrink`, which
removes them physically so that the result is a smaller standard transformers model, and whole Transformer blocks
(`layers`: `drop_layers`, `block_influence`)."""

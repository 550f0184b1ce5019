"""File names and format tags that hf_prune writes, defined once."""

CONFIG_NAME = "pruning_config.json"
MASKS_NAME = "pruning_masks.safetensors"
COMPRESSED_WEIGHTS_NAME = "pruned_weights.safetensors"

MASK_FORMAT = "hf_prune.bitmask.v1"
COMPRESSED_FORMAT = "hf_prune.sparse.v1"

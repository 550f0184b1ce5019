"""File names and format tags that hf_prune writes, defined once."""

CONFIG_NAME = "pruning_config.json"
MASKS_NAME = "pruning_masks.safetensors"
COMPRESSED_WEIGHTS_NAME = "pruned_weights.safetensors"
DEEP_COMPRESSED_WEIGHTS_NAME = "deep_compressed_weights.safetensors"
#: What `QuantizationCallback` writes into each Trainer checkpoint, to resume with the same clusters.
QUANTIZATION_STATE_NAME = "quantization_state.safetensors"

MASK_FORMAT = "hf_prune.bitmask.v1"
COMPRESSED_FORMAT = "hf_prune.sparse.v1"
DEEP_COMPRESSED_FORMAT = "hf_prune.deep.v1"

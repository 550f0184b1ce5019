"""File names and format tags that hf_prune writes, defined once."""

CONFIG_NAME = "pruning_config.json"
MASKS_NAME = "pruning_masks.safetensors"
COMPRESSED_WEIGHTS_NAME = "pruned_weights.safetensors"
DEEP_COMPRESSED_WEIGHTS_NAME = "deep_compressed_weights.safetensors"
#: What `QuantizationCallback` writes into each Trainer checkpoint, to resume with the same clusters.
QUANTIZATION_STATE_NAME = "quantization_state.safetensors"
#: Prefix of the temporary files and folders a write goes through; loading ignores them, a save removes them.
TEMP_PREFIX = ".tmp-"
#: The Trainer's own file in each checkpoint (transformers' `trainer.TRAINER_STATE_NAME`).
TRAINER_STATE_NAME = "trainer_state.json"

MASK_FORMAT = "hf_prune.bitmask.v1"
#: The masks as Huffman-coded gaps between kept positions (`save_pretrained(compression="deep")`).
GAP_MASK_FORMAT = "hf_prune.gapmask.v1"
COMPRESSED_FORMAT = "hf_prune.sparse.v1"
#: v2: the gap stream is optional (a `save_pretrained` folder keeps the positions in its masks file only).
DEEP_COMPRESSED_FORMAT = "hf_prune.deep.v2"
#: Still read: every layer carries its own gap stream.
DEEP_COMPRESSED_FORMAT_V1 = "hf_prune.deep.v1"

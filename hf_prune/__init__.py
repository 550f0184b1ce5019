"""hf_prune: make Transformer models sparse while they fine-tune with the HuggingFace Trainer."""

from .arguments import PruningArguments
from .callbacks import MagnitudePruningCallback
from .compression import (
    QuantizationCallback,
    TrainedQuantizer,
    deep_compression_sizes,
    dequantize,
    load_deep_compressed,
    quantize_weights,
    read_deep_compressed,
    save_deep_compressed,
)
from .config import PruningConfig
from .inference import SparseInferenceReport, SparseLinear, restore_dense_layers, to_sparse_inference
from .methods import (
    DistillationTrainer,
    HanConfig,
    HanPruner,
    HanPruningCallback,
    OBSPruner,
    OBSPruningCallback,
    RegularizationCallback,
    RPPCallback,
    RPPConfig,
    RPPPruner,
    apply_dropout_adjustment,
    get_see_retraining_schedule,
    obs_prune,
    see_retraining_arguments,
)
from .modeling import PrunedModel
from .pruner import Pruner
from .report import SparsityReport, sparsity_report
from .schedules import SparsitySchedule
from .structured.layers import block_influence, drop_layers
from .version import __version__


__all__ = [
    "DistillationTrainer",
    "HanConfig",
    "HanPruner",
    "HanPruningCallback",
    "MagnitudePruningCallback",
    "OBSPruner",
    "OBSPruningCallback",
    "PrunedModel",
    "Pruner",
    "PruningArguments",
    "PruningConfig",
    "QuantizationCallback",
    "RPPCallback",
    "RPPConfig",
    "RPPPruner",
    "RegularizationCallback",
    "SparseInferenceReport",
    "SparseLinear",
    "SparsityReport",
    "SparsitySchedule",
    "TrainedQuantizer",
    "__version__",
    "apply_dropout_adjustment",
    "block_influence",
    "deep_compression_sizes",
    "dequantize",
    "drop_layers",
    "get_see_retraining_schedule",
    "load_deep_compressed",
    "obs_prune",
    "quantize_weights",
    "read_deep_compressed",
    "restore_dense_layers",
    "save_deep_compressed",
    "see_retraining_arguments",
    "sparsity_report",
    "to_sparse_inference",
]

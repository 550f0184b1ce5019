"""hf_prune: make Transformer models sparse while they fine-tune with the HuggingFace Trainer."""

__version__ = "0.1.0"

from .callbacks import MagnitudePruningCallback
from .compression import QuantizationCallback, deep_compression_sizes, dequantize, quantize_weights
from .config import PruningConfig
from .distillation import DistillationTrainer
from .han import (
    HanConfig,
    HanPruner,
    HanPruningCallback,
    RegularizationCallback,
    apply_dropout_adjustment,
    get_see_retraining_schedule,
    see_retraining_arguments,
)
from .modeling import PrunedModel
from .obs import OBSPruner, OBSPruningCallback, obs_prune
from .pruner import Pruner
from .report import SparsityReport, sparsity_report
from .rpp import RPPCallback, RPPConfig
from .schedules import SparsitySchedule


__all__ = [
    "__version__",
    "DistillationTrainer",
    "HanConfig",
    "HanPruner",
    "HanPruningCallback",
    "MagnitudePruningCallback",
    "OBSPruner",
    "OBSPruningCallback",
    "PrunedModel",
    "Pruner",
    "PruningConfig",
    "QuantizationCallback",
    "RPPCallback",
    "RPPConfig",
    "SparsityReport",
    "SparsitySchedule",
    "RegularizationCallback",
    "apply_dropout_adjustment",
    "deep_compression_sizes",
    "dequantize",
    "get_see_retraining_schedule",
    "obs_prune",
    "quantize_weights",
    "see_retraining_arguments",
    "sparsity_report",
]

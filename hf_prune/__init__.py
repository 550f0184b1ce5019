"""hf_prune: make Transformer models sparse while they fine-tune with the HuggingFace Trainer."""

__version__ = "0.1.0"

from .callbacks import MagnitudePruningCallback
from .compression import QuantizationCallback, deep_compression_sizes, dequantize, quantize_weights
from .config import PruningConfig
from .modeling import PrunedModel
from .obs import OBSPruner, OBSPruningCallback, obs_prune
from .pruner import Pruner
from .report import SparsityReport, sparsity_report
from .rpp import RPPCallback, RPPConfig
from .schedules import SparsitySchedule


__all__ = [
    "__version__",
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
    "deep_compression_sizes",
    "dequantize",
    "obs_prune",
    "quantize_weights",
    "sparsity_report",
]

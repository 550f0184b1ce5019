"""hf_prune: make Transformer models sparse while they fine-tune with the HuggingFace Trainer."""

__version__ = "0.1.0"

from .callbacks import MagnitudePruningCallback
from .config import PruningConfig
from .modeling import PrunedModel
from .pruner import Pruner
from .report import SparsityReport, sparsity_report
from .schedules import SparsitySchedule


__all__ = [
    "__version__",
    "MagnitudePruningCallback",
    "PrunedModel",
    "Pruner",
    "PruningConfig",
    "SparsityReport",
    "SparsitySchedule",
    "sparsity_report",
]

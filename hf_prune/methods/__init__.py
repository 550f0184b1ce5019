"""Pruning methods built on the core's masks, one module each: Reweighted Proximal Pruning (`rpp`), layer-wise
Optimal Brain Surgeon (`obs`), Han et al.'s iterative pruning (`han`) with its L1/L2 regularisation
(`regularization`) and dropout adjustment (`dropout`), See et al.'s retraining schedule (`retraining`), and
knowledge distillation from the dense model (`distillation`)."""

from .distillation import DistillationTrainer
from .dropout import apply_dropout_adjustment
from .han import HanConfig, HanPruner, HanPruningCallback
from .obs import OBSPruner, OBSPruningCallback, obs_prune
from .regularization import RegularizationCallback
from .retraining import get_see_retraining_schedule, see_retraining_arguments
from .rpp import RPPCallback, RPPConfig, RPPPruner


__all__ = [
    "DistillationTrainer",
    "HanConfig",
    "HanPruner",
    "HanPruningCallback",
    "OBSPruner",
    "OBSPruningCallback",
    "RPPCallback",
    "RPPConfig",
    "RPPPruner",
    "RegularizationCallback",
    "apply_dropout_adjustment",
    "get_see_retraining_schedule",
    "obs_prune",
    "see_retraining_arguments",
]

"""Pruning criteria: how important each weight is. The lowest scores are pruned first."""

from __future__ import annotations

import torch


class Criterion:
    """Base class of the scores masks are computed from.

    `score(name, weight)` returns a fresh, non-negative float32 tensor of the weight's shape.
    """

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MagnitudeCriterion(Criterion):
    """|w|: the magnitude criterion of Han et al. 2015, See et al. 2016 and Zhu & Gupta 2017."""

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs().float()


CRITERIA: dict[str, type[Criterion]] = {"magnitude": MagnitudeCriterion}

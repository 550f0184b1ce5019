"""Sparsity tables: per layer, per weight class and overall."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import PruningConfig
from .structured.units import pruned_targets
from .targets import named_weights, weight_class


@dataclass(frozen=True)
class LayerSparsity:
    """One targeted weight: its name, class, shape and how many of its entries are pruned."""

    name: str
    weight_class: str
    shape: tuple[int, ...]
    numel: int
    pruned: int

    @property
    def sparsity(self) -> float:
        """Pruned fraction of the weight (0 for a weight without entries: nothing of it is pruned)."""
        return self.pruned / max(1, self.numel)


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer sparsity of the targeted weights; `str(report)` is a terminal table."""

    layers: tuple[LayerSparsity, ...]

    @property
    def overall(self) -> float:
        """Pruned fraction of all targeted weights (embeddings never count)."""
        return sum(r.pruned for r in self.layers) / max(1, sum(r.numel for r in self.layers))

    def by_class(self) -> dict[str, float]:
        """Pruned fraction of each weight class."""
        pruned: dict[str, int] = defaultdict(int)
        total: dict[str, int] = defaultdict(int)
        for row in self.layers:
            pruned[row.weight_class] += row.pruned
            total[row.weight_class] += row.numel
        return {cls: pruned[cls] / max(1, total[cls]) for cls in total}

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], class_granularity: str = "role") -> SparsityReport:
        """The report of `masks` alone (pruned = mask False), with weight classes from the parameter names."""
        return cls(tuple(LayerSparsity(name, weight_class(name.removesuffix(".weight"), class_granularity),
                                       tuple(mask.shape), mask.numel(), mask.numel() - int(mask.sum()))
                         for name, mask in masks.items()))

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable summary: overall, per class and per layer."""
        return {"overall": self.overall, "by_class": self.by_class(),
                "by_layer": {row.name: row.sparsity for row in self.layers}}

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(name, shape, non-zero / total, sparsity) per layer, then a row per class and the total."""
        table = [(r.name, "x".join(map(str, r.shape)), f"{r.numel - r.pruned:,} / {r.numel:,}",
                  f"{r.sparsity:.2%}") for r in self.layers]
        table += [(f"class {cls}", "", "", f"{value:.2%}") for cls, value in self.by_class().items()]
        total = sum(r.numel for r in self.layers)
        kept = total - sum(r.pruned for r in self.layers)
        table.append(("total (targeted weights)", "", f"{kept:,} / {total:,}", f"{self.overall:.2%}"))
        return table

    def to_markdown(self) -> str:
        lines = ["| weight | shape | non-zero / total | sparsity |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        header = ("weight", "shape", "non-zero / total", "sparsity")
        table = [header, *self.rows()]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))) for row in table)


def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None,
                    config: PruningConfig | None = None) -> SparsityReport:
    """Per-layer sparsity of `model`'s targeted weights.

    With `masks`, the masked weights are reported (pruned = mask False); without, the weights pruning under
    `config` would mask (default: the Linear layers inside the Transformer blocks; with a `structure`, those of
    its neurons / heads) and their zeros.
    """
    config = config or PruningConfig()
    if masks is not None:
        return SparsityReport.from_masks(masks, config.class_granularity)
    params = named_weights(model)
    return SparsityReport(tuple(LayerSparsity(t.name, t.weight_class, tuple(params[t.name].shape),
                                              params[t.name].numel(), int((params[t.name] == 0).sum()))
                                for t in pruned_targets(model, config)))

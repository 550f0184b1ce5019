"""Pruning criteria: how important each weight is. The lowest scores are pruned first."""

from __future__ import annotations

from collections.abc import Mapping

import torch


ALL_ROWS = slice(None)


class Criterion:
    """Base class of the scores masks are computed from.

    `score(name, weight, rows)` returns a fresh, non-negative float32 tensor shaped like `weight[rows]` (the
    mask code scores a block of rows at a time, to bound its temporaries whatever the layer size). A criterion that
    ranks by gradient statistics sets `needs_gradients = True`: the `Pruner` then passes it the gradients of the
    optimizer steps before each pruning event (`observe_gradients`) and calls `reset()` after every event.
    """

    needs_gradients: bool = False
    #: Whether the criterion ranks by the inputs of the targeted layers (the `Pruner` then passes them to
    #: `observe_inputs` during the forward passes before each pruning event).
    needs_inputs: bool = False
    #: How a group's score (a neuron, a head: `hf_prune.structured`) sums its entries' scores: `1`, the sum;
    #: `2`, the L2 norm (the square root of the sum of squares).
    group_norm: int = 1

    def score(self, name: str, weight: torch.Tensor, rows: slice = ALL_ROWS) -> torch.Tensor:
        raise NotImplementedError

    def spread_values(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """What `scheme="class-distribution"` takes the std σ_c of, per class, to divide the scores by: the scores
        themselves (each criterion's scores have a scale of their own, as |w|·‖x‖ or ½·F·w² do)."""
        return self.score(name, weight)

    def observe_gradients(self, gradients: Mapping[str, torch.Tensor]) -> None:
        """Records one observation of the targeted weights' gradients (parameter name -> gradient); by default,
        nothing (the criterion does not use gradients)."""

    def observe_inputs(self, name: str, inputs: torch.Tensor, input_dim: int) -> None:
        """Records one batch of inputs of the layer of weight `name`; `input_dim` is the weight's dimension that
        runs over the input features (1 for `nn.Linear`, 0 for GPT-2's `Conv1D`). By default, nothing."""

    def reset(self) -> None:
        """Frees whatever was recorded for the pruning event that just happened; by default, nothing."""

    def has_statistics(self) -> bool:
        """Whether what `score` needs was recorded (always, for a criterion that needs nothing)."""
        return True

    def missing_statistics(self) -> ValueError:
        """The error of an event without statistics (raised by `score`, and by the `Pruner` on every rank)."""
        return ValueError(f"{type(self).__name__} has no statistics for this pruning event.")


class MagnitudeCriterion(Criterion):
    """|w|: the magnitude criterion of Han et al. 2015, See et al. 2016 and Zhu & Gupta 2017."""

    group_norm = 2

    def score(self, name: str, weight: torch.Tensor, rows: slice = ALL_ROWS) -> torch.Tensor:
        return weight.detach()[rows].abs().float()

    def spread_values(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The weights (See et al. 2016: prune `|w| < λ·σ_c`, σ_c the std of the class's weights)."""
        return weight


class OBDCriterion(Criterion):
    """½·F_ii·w_i²: Optimal Brain Damage (LeCun et al. 1989) with the empirical Fisher diagonal as the Hessian's.

    OBD ranks a weight by the loss increase its removal alone causes under a quadratic model of the loss around a
    minimum with a diagonal Hessian, `½·h_ii·w_i²`. `h_ii` is estimated by `F_ii`, the mean of `g_i²` over the
    observed gradients `g` (the empirical Fisher diagonal; for a negative log-likelihood, the Fisher equals the
    expected Hessian when the data follow the model). During training the observations are the gradients of the
    `fisher_steps` optimizer steps before each pruning event as the optimizer gets them (accumulated over the
    micro-batches, clipped): mini-batch gradients, not per-example ones, so near a minimum `F` is about the
    per-example Fisher divided by the batch size, the same factor for every weight. The steps are weighted
    equally whatever the learning rate. `Pruner.estimate_fisher` records them from data without training, for
    one-shot pruning. An event with fewer observations than `fisher_steps` (`start_step < fisher_steps`, or a run
    resumed inside a window: the statistics are not checkpointed) uses those it has; one with none is an error.

    Memory: one float32 accumulator per targeted weight, allocated at the first observation and freed by
    `reset()` (right after each pruning event). A non-finite statistic (an fp16 step with overflowing gradients
    that the grad scaler skips) makes the weight's score the float32 maximum, so that weight is kept.
    """

    needs_gradients = True

    def __init__(self) -> None:
        self.squared_gradients: dict[str, torch.Tensor] = {}
        self.observations = 0

    @torch.no_grad()
    def observe_gradients(self, gradients: Mapping[str, torch.Tensor]) -> None:
        """Adds `g²` of every gradient to its float32 accumulator; gradients of frozen weights are absent."""
        if not gradients:
            return
        for name, gradient in gradients.items():
            if name not in self.squared_gradients:
                self.squared_gradients[name] = torch.zeros_like(gradient, dtype=torch.float32)
            self.squared_gradients[name].addcmul_(gradient, gradient)
        self.observations += 1

    def reset(self) -> None:
        self.squared_gradients = {}
        self.observations = 0

    def has_statistics(self) -> bool:
        return self.observations > 0

    def missing_statistics(self) -> ValueError:
        return ValueError(
            "criterion 'obd' has no gradient statistics for this pruning event. During training it records the "
            "gradients of the `fisher_steps` optimizer steps before each event (`Pruner.observe_gradients_`, "
            "called by the callbacks), so the first event needs `start_step` >= `fisher_steps` (an event at "
            "step 0 has no gradients) and the targeted weights must receive gradients (not frozen); for "
            "one-shot pruning call `Pruner.estimate_fisher` first."
        )

    @torch.no_grad()
    def score(self, name: str, weight: torch.Tensor, rows: slice = ALL_ROWS) -> torch.Tensor:
        if not self.has_statistics():
            raise self.missing_statistics()
        saliency = weight.detach()[rows].float().square()
        if name not in self.squared_gradients:  # no gradient reached this weight: removing it costs nothing
            return saliency.zero_()
        saliency.mul_(self.squared_gradients[name][rows]).mul_(0.5 / self.observations)
        return saliency.nan_to_num_(nan=torch.finfo(torch.float32).max)


class WandaCriterion(Criterion):
    """|W_ij|·‖X_j‖₂: Wanda (Sun et al. 2024), a weight's magnitude times the L2 norm of its input feature over the
    tokens the layer saw, so a small weight on a large activation is kept.

    During training the inputs are those of the forward passes of the `fisher_steps` optimizer steps before each
    pruning event (after a resume inside such a window, only those after the resume: the statistics are not
    checkpointed); `Pruner.estimate_fisher` records them from data without training (one-shot). For a group (a
    neuron or a head, `PruningConfig.structure`) the score is the sum over its weights,
    `S_g = Σ_{(i, j) ∈ g} |W_ij|·‖X_j‖₂`: a neuron's up / gate rows weighted by the block's input norms, and its
    down-projection column by the neuron's own activation norm. Memory: one float32 accumulator per input feature
    of each targeted layer, freed after each event. An event with no recorded inputs is an error; a layer that saw
    none while others did (layerdrop, an expert no token was routed to) has ‖X‖ = 0, so its weights score 0, as
    under OBD a weight that no gradient reached.
    """

    needs_inputs = True

    def __init__(self) -> None:
        self.squared_inputs: dict[str, tuple[torch.Tensor, int]] = {}

    @torch.no_grad()
    def observe_inputs(self, name: str, inputs: torch.Tensor, input_dim: int) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        squares = flat.square().sum(0)
        if name in self.squared_inputs:
            squares += self.squared_inputs[name][0]
        self.squared_inputs[name] = (squares, input_dim)

    def reset(self) -> None:
        self.squared_inputs = {}

    def has_statistics(self) -> bool:
        return bool(self.squared_inputs)

    def missing_statistics(self) -> ValueError:
        return ValueError(
            "criterion 'wanda' has no layer inputs for this pruning event. During training it records the "
            "inputs of the forward passes of the `fisher_steps` optimizer steps before each event, so the first "
            "event needs `start_step` >= `fisher_steps`; for one-shot pruning call `Pruner.estimate_fisher` first."
        )

    @torch.no_grad()
    def score(self, name: str, weight: torch.Tensor, rows: slice = ALL_ROWS) -> torch.Tensor:
        if not self.has_statistics():
            raise self.missing_statistics()
        if name not in self.squared_inputs:  # the layer ran on no input: ‖X‖ = 0
            return torch.zeros_like(weight[rows], dtype=torch.float32)
        squares, input_dim = self.squared_inputs[name]
        norms = squares.sqrt().to(weight.device)
        norms = norms[None, :] if input_dim == 1 else norms[rows, None]
        # a NaN input norm (an overflow) may carry the sign bit, which would rank first: kept, as OBD keeps it
        return weight.detach()[rows].abs().float().mul_(norms).nan_to_num_(nan=torch.finfo(torch.float32).max)


CRITERIA: dict[str, type[Criterion]] = {"magnitude": MagnitudeCriterion, "obd": OBDCriterion, "wanda": WandaCriterion}

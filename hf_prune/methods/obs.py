"""Optimal Brain Surgeon in a form that scales: one-shot pruning from calibration data (SparseGPT / OBC).

OBS (Hassibi & Stork 1992) removes the weight `w_q` with the lowest saliency `w_q² / (2·[H⁻¹]_qq)` and moves the
others by `δw = −(w_q / [H⁻¹]_qq)·H⁻¹e_q`, which is the exact optimum for a quadratic loss. The full-network
Hessian is (weights × weights); here, as in OBC (Frantar & Alistarh 2022) and SparseGPT (Frantar & Alistarh 2023),
each layer is pruned to reconstruct its own outputs, `min ||WX − ŴX||²`, whose Hessian `H = 2·X·Xᵀ` is only
(inputs × inputs) and is the same for every output row. SparseGPT's solver then prunes a (rows × inputs) layer in
`O(inputs³ + rows·inputs²)`: `H` is dampened, the upper Cholesky factor `U` of `H⁻¹` gives in its row `q` the
`H⁻¹e_q / sqrt([H⁻¹]_qq)` of the inputs not yet processed, columns are visited left to right in blocks of
`block_size` with the OBS update applied lazily to the columns after the block, and the mask of each block is
chosen adaptively from the weights as updated so far.
"""

from __future__ import annotations

import itertools
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..batches import model_inputs
from ..callbacks import MagnitudePruningCallback
from ..config import PruningConfig
from ..distributed import refuse_sharded
from ..pruner import Pruner
from ..targets import Target, find_targets, prunable_modules
from ..validation import check_int, check_number


_PATTERN = re.compile(r"(\d+):(\d+)")
#: The first indexed module of a name (`"bert.encoder.layer.3"` of `"bert.encoder.layer.3.attention.self.query"`).
_BLOCK = re.compile(r"(?:^|.*?\.)\d+(?=\.|$)")
_SOLVER_DTYPE = torch.float64
#: `obs_prune`'s defaults (columns updated together; dampening as a fraction of mean(diag H)), OBSPruner's settings.
_BLOCK_SIZE, _DAMPENING = 128, 0.01


class _StopForward(Exception):
    """Raised by a calibration hook once every layer being calibrated has seen its input for the current batch."""


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """`"N:M"` -> `(N, M)`: N of every M consecutive weights along the input dimension are kept. None -> None.

    Raises:
        ValueError: unless `pattern` is None or `"N:M"` with integers `0 < N < M`.
    """
    match = _PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
    if pattern is not None and (match is None or not 0 < int(match[1]) < int(match[2])):
        raise ValueError(f"`pattern` must be None or 'N:M' with integers 0 < N < M (N of every M consecutive input "
                         f"weights kept, e.g. '2:4'); got {pattern!r}.")
    return None if pattern is None else (int(match[1]), int(match[2]))


def _resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The fraction pruned: `sparsity` itself when unstructured, `(M − N) / M` for an N:M pattern.

    Raises:
        ValueError: when `sparsity` is not in [0, 1) (unstructured) or differs from what the pattern prunes.
    """
    number = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
    sparsity = float(sparsity) if number else sparsity  # a NumPy float too
    if nm is None:
        if not number or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be a number in [0, 1) for unstructured pruning (pattern=None); "
                             f"got {sparsity!r}.")
        return float(sparsity)
    implied = (nm[1] - nm[0]) / nm[1]
    if sparsity is not None and (not number or abs(sparsity - implied) > 1e-9):
        raise ValueError(f"`sparsity` {sparsity!r} cannot be expressed by pattern '{nm[0]}:{nm[1]}', which prunes "
                         f"exactly {implied:g}; accepted: None or {implied:g}.")
    return implied


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask (True = kept) of the `n` highest `scores` in each group of `m` consecutive columns.

    `scores` is (rows, columns) with `columns` a multiple of `m`; for a layer, columns are its inputs (an
    `nn.Linear` weight as it is, a GPT-2 `Conv1D` weight transposed). Ties go to the lower column (a stable sort:
    `topk` breaks them in an order of its own, which may differ between devices).
    """
    rows, columns = scores.shape
    grouped = scores.reshape(rows, columns // m, m)
    kept = torch.zeros_like(grouped, dtype=torch.bool)
    kept.scatter_(2, grouped.sort(dim=2, descending=True, stable=True).indices[..., :n], True)
    return kept.reshape(rows, columns)


def obs_update_(weights: torch.Tensor, hinv_row: torch.Tensor, column: int, pruned: torch.Tensor) -> torch.Tensor:
    """Prunes `weights[r, column]` for every row `r` where `pruned` is True with the OBS update, in place.

    Every row of a layer is its own OBS problem over the same Hessian `H` of the layer's inputs: with `q = column`,
    `δw = −(w_q / [H⁻¹]_qq)·H⁻¹e_q` sets `w_q` to zero and increases `||WX − ŴX||²` by the least possible amount,
    the saliency `w_q² / (2·[H⁻¹]_qq)`. Only the ratio `H⁻¹e_q / [H⁻¹]_qq` enters, so `hinv_row` may be any vector
    proportional to `H⁻¹e_q` over the columns of `weights`: row `q` of `H⁻¹` itself, or the row of the Cholesky
    factor of `H⁻¹` that SparseGPT uses (then `H` is the Hessian of the columns from `q` on, the earlier ones fixed).

    Args:
        weights (`torch.Tensor`): (rows, columns) weights, updated in place; the pruned entries become exactly 0.
        hinv_row (`torch.Tensor`): (columns,) vector proportional to `H⁻¹e_q`.
        column (`int`): `q`, the column of the pruned weights.
        pruned (`torch.Tensor`): (rows,) bool, the rows whose weight in `column` is pruned.

    Returns:
        `torch.Tensor`: (rows,) `w_q / hinv_row[q]` (0 for unpruned rows): the coefficient of `hinv_row` in the
        update, with which the caller updates columns beyond `weights` lazily.
    """
    coefficient = torch.where(pruned, weights[:, column] / hinv_row[column], 0.0)
    weights.sub_(torch.outer(coefficient, hinv_row))
    weights[:, column].masked_fill_(pruned, 0.0)
    return coefficient


def _inverse_hessian_factor(hessian: torch.Tensor, dampening: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor `U` of `(H + λI)⁻¹ = UᵀU`, `λ = dampening · mean(diag H)`."""
    hessian.diagonal().add_(dampening * hessian.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"The input Hessian of {name} is not positive definite even with `dampening`={dampening} "
                         f"({err}); use more calibration tokens or a larger `dampening` (e.g. 0.01).") from None


def _prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                  block_size: int, dampening: float, name: str) -> torch.Tensor:
    """SparseGPT on `weight` (rows, inputs), in place; returns its mask (True = kept).

    Inputs that were always zero in calibration (`H_qq = 0`) have their weights zeroed first: they cost nothing to
    prune, so they are pruned first. Unstructured, each block of columns gets `round(s·rows·end) − round(s·rows·
    start)` pruned weights (the lowest saliencies in the block, across all rows), so the layer gets exactly
    `round(s · weight.numel())`. N:M picks each group of M columns when the solver reaches it.
    """
    rows, columns = weight.shape
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    weight[:, dead] = 0.0
    hinv = _inverse_hessian_factor(hessian, dampening, name)
    kept = torch.ones_like(weight, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, block_hinv = weight[:, start:end], hinv[start:end, start:end]
        scale = block_hinv.diagonal().square()
        block_kept = block.new_ones(block.shape, dtype=torch.bool)
        if nm is None:
            count = round(sparsity * (rows * end)) - round(sparsity * (rows * start))
            lowest = (block.square() / scale).reshape(-1).topk(count, largest=False).indices
            block_kept.view(-1)[lowest] = False
        coefficients = block.new_zeros(block.shape)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                block_kept[:, group] = nm_mask(block[:, group].square() / scale[group], *nm)
            coefficients[:, i] = obs_update_(block[:, i:], block_hinv[i, i:], 0, ~block_kept[:, i])
        weight[:, end:] -= coefficients @ hinv[start:end, end:]
        kept[:, start:end] = block_kept
    return kept


def _as_rows(module: nn.Module) -> torch.Tensor:
    """The weight as (outputs, inputs): `nn.Linear`'s own layout, GPT-2 `Conv1D`'s (inputs, outputs) transposed."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _run_batch(model: nn.Module, batch: Any, device: torch.device) -> None:
    args, kwargs = model_inputs(batch, device, "calibration_dataloader")
    try:
        model(*args, **kwargs)
    except _StopForward:
        pass
    except Exception as err:
        raise ValueError(f"{type(model).__name__} does not accept the batches of `calibration_dataloader` "
                         f"({type(err).__name__}: {err}); it must yield dicts of keyword arguments of the model's "
                         "forward (input_ids, attention_mask, ...) or tensors of inputs.") from err


def _collect_hessians(model: nn.Module, modules: Mapping[str, nn.Module],
                      calibration_dataloader: Iterable[Any]) -> dict[str, torch.Tensor]:
    """`H = 2/n · Σ x·xᵀ` over the `n` input vectors (every position of every batch) of each module.

    One pass over the data with forward pre-hooks; the forward stops as soon as every module has seen its input
    for the batch, so later blocks are not run. A module called several times per forward (weights shared across
    blocks) contributes the inputs of its first call only.
    """
    sums = {name: torch.zeros(_as_rows(m).shape[1], _as_rows(m).shape[1], dtype=_SOLVER_DTYPE,
                              device=m.weight.device) for name, m in modules.items()}
    counts = dict.fromkeys(modules, 0)
    seen: set[str] = set()

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen:
                inputs = args[0].detach().reshape(-1, args[0].shape[-1]).to(sums[name])
                sums[name].addmm_(inputs.T, inputs)
                counts[name] += inputs.shape[0]
                seen.add(name)
            if len(seen) == len(modules):
                raise _StopForward
        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        for batch in calibration_dataloader:
            seen.clear()
            _run_batch(model, batch, next(model.parameters()).device)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise ValueError(f"{', '.join(missing)} received no input from `calibration_dataloader`: it is empty, "
                         "exhausted (pass something iterable more than once, such as a DataLoader or a list: every "
                         "block of layers needs its own pass), or its batches do not reach these layers.")
    return {name: total.mul_(2.0 / counts[name]) for name, total in sums.items()}


def _block_of(target: Target) -> str:
    match = _BLOCK.match(target.module_name)
    return match[0] if match else target.module_name


def _check_calibration_data(calibration_dataloader: Any) -> None:
    if calibration_dataloader is None:
        raise ValueError("`calibration_dataloader` is None; OBS needs calibration batches to estimate each layer's "
                         "input Hessian (e.g. a DataLoader of 128 training examples).")
    if isinstance(calibration_dataloader, Iterator):
        raise ValueError(f"`calibration_dataloader` is a one-shot iterator ({type(calibration_dataloader).__name__}):"
                         " OBS iterates it once per Transformer block; pass a DataLoader or a list of batches.")


def _check_obs_config(config: PruningConfig, user: str, prunes_in_training: bool = True,
                      pattern: str | None = None) -> None:
    """Refuses a structured config, and for a pruner of a training run a criterion other than "magnitude" (it would
    gather gradient / input statistics that OBS never reads), a schedule other than "oneshot" and a
    `final_sparsity` that `pattern` cannot express (what `obs_prune` would refuse at the pruning event)."""
    if prunes_in_training and config.criterion != "magnitude":
        raise ValueError(f"`criterion` must be 'magnitude' for {user} (OBS ranks weights by its own Hessian-based "
                         f"saliency); got {config.criterion!r}.")
    if prunes_in_training and config.schedule != "oneshot":
        raise ValueError(f"`schedule` must be 'oneshot' for {user} (OBS prunes once, at start_step); got "
                         f"{config.schedule!r}.")
    if prunes_in_training:
        _resolve_sparsity(config.final_sparsity, parse_pattern(pattern))
    if config.structures():
        raise ValueError(f"`structure` must be 'unstructured' for {user} (OBS prunes single weights, or N:M groups of "
                         f"them); got {config.structure!r}. For neurons or heads use a MagnitudePruningCallback with "
                         "that config.")


def _check_solver_arguments(modules: Mapping[str, nn.Module], nm: tuple[int, int] | None, block_size: int,
                            dampening: float) -> None:
    check_int("block_size", block_size, 1)
    check_number("dampening", dampening, 0.0)
    if nm is None:
        return
    if block_size % nm[1]:
        raise ValueError(f"`block_size` must be a multiple of M={nm[1]} for pattern '{nm[0]}:{nm[1]}'; "
                         f"got {block_size}.")
    misfits = [f"{name} ({_as_rows(m).shape[1]} inputs)" for name, m in modules.items()
               if _as_rows(m).shape[1] % nm[1]]
    if misfits:
        raise ValueError(f"Pattern '{nm[0]}:{nm[1]}' needs a number of inputs divisible by {nm[1]}; not so for "
                         f"{', '.join(misfits)}. Leave them out with `exclude_modules`.")


@torch.no_grad()
def obs_prune(model: nn.Module, calibration_dataloader: Iterable[Any], sparsity: float | None,
              pattern: str | None = None, config: PruningConfig | None = None, block_size: int = _BLOCK_SIZE,
              dampening: float = _DAMPENING, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Prunes `model` one-shot with OBS from calibration data, layer by layer (SparseGPT); no retraining needed.

    The targeted layers (`find_targets(model, config)`: by default the Linear / `Conv1D` layers of the Transformer
    blocks) are processed block by block, sequentially: one pass over `calibration_dataloader` collects the input
    Hessian `H = 2/n·Σ x·xᵀ` of every targeted layer of a block (every position of every batch counts, padding
    included, so calibrate with little padding), then each of those layers is pruned with the OBS update of the
    remaining weights, and the next block is calibrated on the outputs of the pruned ones. Every layer gets the
    same sparsity (the `scheme` of `config` is not used). Hessians are accumulated and solved in float64 on the
    weights' devices; nothing larger than the input Hessians of one block's layers plus a few (inputs × inputs)
    and (rows × inputs) temporaries of one layer is ever held.

    ```python
    loader = DataLoader(calibration_examples, batch_size=16, collate_fn=collator)
    masks = obs_prune(model, loader, sparsity=0.5)          # or sparsity=None, pattern="2:4"
    pruned = PrunedModel(model, masks, PruningConfig(schedule="oneshot", final_sparsity=0.5))
    ```

    Args:
        model (`nn.Module`): the model; its targeted weights are modified in place, block by block (an error
            after the first block says which layers were already changed). It runs in eval mode during
            calibration and gets its training mode back afterwards.
        calibration_dataloader (`Iterable`): batches for `model(**batch)` (dicts) or `model(batch)` (tensors),
            iterated once per block, so not a one-shot generator.
        sparsity (`float`, *optional*): fraction pruned in each layer, exactly `round(sparsity · numel)`. With a
            `pattern`, None or the pattern's own `(M − N) / M`.
        pattern (`str`, *optional*): `"N:M"` semi-structured sparsity: in each group of M consecutive weights along
            the input dimension exactly N are kept (`"2:4"` keeps 2 of every 4).
        config (`PruningConfig`, *optional*): which weights are targeted (`target_modules`, `exclude_modules`,
            `prune_head`; `structure` must be "unstructured"). Defaults to `PruningConfig()`.
        block_size (`int`, *optional*, defaults to 128): columns updated together; a multiple of M for N:M.
        dampening (`float`, *optional*, defaults to 0.01): `λ / mean(diag H)`, added to the diagonal of `H`.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over the layers.

    Returns:
        `dict[str, torch.Tensor]`: parameter name -> `torch.bool` mask (True = kept), for `Pruner.load_masks` or
        `PrunedModel`. The pruned weights are exactly zero in `model`.

    Raises:
        ValueError: on a malformed `pattern`, a `sparsity` it cannot express, a structured `config`, missing or unusable calibration data,
            a layer whose input count the pattern does not divide, or a Hessian that dampening cannot make
            positive definite.
    """
    nm = parse_pattern(pattern)
    sparsity = _resolve_sparsity(sparsity, nm)
    config = config or PruningConfig()
    _check_obs_config(config, "obs_prune", prunes_in_training=False)
    targets = find_targets(model, config)
    modules = prunable_modules(model)
    _check_calibration_data(calibration_dataloader)
    _check_solver_arguments({t.module_name: modules[t.module_name] for t in targets}, nm, block_size, dampening)
    was_training = model.training
    model.eval()
    masks = {}
    try:
        with tqdm(total=len(targets), desc="OBS pruning", unit="layer", disable=not show_progress) as bar:
            for _, block in itertools.groupby(targets, key=_block_of):
                block = list(block)
                hessians = _collect_hessians(model, {t.module_name: modules[t.module_name] for t in block},
                                             calibration_dataloader)
                for target in block:
                    bar.set_postfix_str(target.module_name)
                    weight = _as_rows(modules[target.module_name])
                    solved = weight.to(_SOLVER_DTYPE, copy=True)
                    kept = _prune_weight(solved, hessians.pop(target.module_name), sparsity, nm, block_size,
                                         dampening, target.module_name)
                    weight.copy_(solved)
                    transposed = isinstance(modules[target.module_name], Conv1D)
                    masks[target.name] = (kept.T if transposed else kept).contiguous()
                    bar.update()
    except Exception as error:  # the solved layers are written in place: bounded memory keeps no originals
        if masks:
            names = list(masks)
            error.add_note(f"OBS had already pruned and updated {len(names)} of {len(targets)} layers in place "
                           f"({names[0]} ... {names[-1]}): reload the model before trying again.")
        raise
    finally:
        model.train(was_training)
    return masks


class OBSPruner(Pruner):
    """A `Pruner` whose pruning event runs `obs_prune` (weights updated, masks loaded) instead of ranking scores.

    Args:
        model (`nn.Module`): the model to prune.
        config (`PruningConfig`): targets and schedule; only `schedule="oneshot"` makes sense, the sparsity of
            its event is `final_sparsity`.
        calibration_dataloader (`Iterable`): batches for `obs_prune`.
        pattern (`str`, *optional*): `"N:M"` pattern for `obs_prune`.
        max_steps (`int`, *optional*): the run's number of optimizer steps.
    """

    def __init__(self, model: nn.Module, config: PruningConfig, calibration_dataloader: Iterable[Any],
                 pattern: str | None = None, max_steps: int | None = None) -> None:
        _check_obs_config(config, "OBSPruner", pattern=pattern)
        super().__init__(model, config, max_steps)
        refuse_sharded(self.params.values(), "OBSPruner")
        # what obs_prune would refuse at the pruning event, refused now (before any training step)
        modules = prunable_modules(self.module)
        _check_solver_arguments({name.rpartition(".")[0]: modules[name.rpartition(".")[0]] for name in self.params},
                                parse_pattern(pattern), _BLOCK_SIZE, _DAMPENING)
        self.calibration_dataloader = calibration_dataloader
        self.pattern = pattern

    def prune_to(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        masks = obs_prune(self.module, self.calibration_dataloader, sparsity, self.pattern, self.config)
        self.load_masks(masks)
        self.target_sparsity = sparsity
        self.thresholds = {}
        if optimizer is not None:
            self.mask_optimizer_state_(optimizer)


class OBSPruningCallback(MagnitudePruningCallback):
    """One-shot OBS pruning (`obs_prune`) at `config.start_step` of `Trainer.train()`, then training with fixed masks.

    Masking, checkpointing of the masks, resuming and sparsity logging are those of `MagnitudePruningCallback`.
    The calibration data is not part of `state()`, so `restore_callback_states_from_checkpoint=True` cannot rebuild
    this callback; resuming with the callback passed to the Trainer again (the default) restores the saved masks.

    ```python
    callback = OBSPruningCallback(PruningConfig(schedule="oneshot", final_sparsity=0.5), calibration_loader)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    ```

    Args:
        config (`PruningConfig` or `dict`): with `schedule="oneshot"`; `final_sparsity` is pruned in every layer.
        calibration_dataloader (`Iterable`): calibration batches (see `obs_prune`).
        pattern (`str`, *optional*): `"N:M"`, with `final_sparsity` equal to `(M − N) / M`.
    """

    def __init__(self, config: PruningConfig | dict[str, Any] | None, calibration_dataloader: Iterable[Any],
                 pattern: str | None = None) -> None:
        super().__init__(config)
        _check_obs_config(self.config, "OBSPruningCallback", pattern=pattern)
        _check_calibration_data(calibration_dataloader)
        self.calibration_dataloader = calibration_dataloader
        self.pattern = pattern

    @classmethod
    def from_pretrained(cls, pretrained_path: Any, config: PruningConfig | None = None,
                        **hub_kwargs: Any) -> MagnitudePruningCallback:
        """Not for this class: a saved OBS-pruned model keeps training with its masks fixed through
        `MagnitudePruningCallback.from_pretrained(path)`; raises `ValueError` saying so."""
        raise ValueError("OBSPruningCallback prunes once from calibration data and cannot start from saved masks; to "
                         f"keep training {pretrained_path} with its masks, use "
                         "MagnitudePruningCallback.from_pretrained(path).")

    def make_pruner(self, model: nn.Module, max_steps: int | None) -> Pruner:
        return OBSPruner(model, self.config, self.calibration_dataloader, self.pattern, max_steps=max_steps)

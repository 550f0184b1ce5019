"""`QuantizationCallback`: trained quantization during `Trainer.train()` of a pruned model."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..callbacks import (
    MagnitudePruningCallback,
    checkpoint_being_pushed,
    checkpoint_being_written,
    checkpoint_folder,
    find_checkpoint_file,
    mismatch_causes,
    pruning_callback_of,
)
from ..constants import QUANTIZATION_STATE_NAME
from .deep_format import read_deep_compressed, save_deep_compressed
from .quantization import QuantizedWeight, TrainedQuantizer, check_quantizer_arguments


logger = logging.getLogger(__name__)

_STILL_PRUNING = ("The pruning schedule is still running when quantization starts ({}); Deep Compression quantizes "
                  "after pruning: finish pruning in an earlier run, or use a oneshot schedule at step 0.")


class QuantizationCallback(TrainerCallback, ExportableState):
    """Trained quantization during `Trainer.train()` of a pruned model (Deep Compression's second stage).

    At train begin, a `TrainedQuantizer` clusters each masked weight's kept entries into `2**bits` centroids and
    overwrites the weight with its centroid values (0 at the pruned positions). At every optimizer step, before it
    (`on_pre_optimizer_step`, after the Trainer's gradient clipping) each centroid takes one plain SGD step on the
    summed gradients of its weights, with `learning_rate` or by default the current learning rate of the
    optimizer group holding the weight (so the Trainer's schedule applies), and the weight's gradient is dropped
    (no Adam moments, no weight decay: the centroid step is its only update); after it (`on_optimizer_step`) each
    weight is rewritten from its centroids.

    Masks and cluster assignments never change: pruned weights stay exactly 0 and every kept weight is one of its
    layer's centroids (rounded to the weight's dtype: in a bf16 / fp16 model the centroids train in float32, as
    master weights do, and dequantizing them into the model's dtype gives its weights exactly). The other
    parameters (embeddings, LayerNorms, biases, head) train as usual. Each checkpoint gets
    `quantization_state.safetensors` (written with the checkpoint's weights, before `save_total_limit` deletes
    older checkpoints), and `resume_from_checkpoint` restores it; with `load_best_model_at_end` the best
    checkpoint's is loaded with its weights. After training, pass `callback.quantized` to `save_deep_compressed`.
    With fp16 mixed precision keep `max_grad_norm > 0`: the Trainer unscales the gradients when it clips them,
    before this callback reads them.

    ```python
    from hf_prune import MagnitudePruningCallback, QuantizationCallback

    pruning = MagnitudePruningCallback.from_pretrained("pruned")  # or the masks of a PrunedModel
    quantization = QuantizationCallback(bits=4)  # the masks of the pruning callback before it
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[pruning, quantization]).train()
    ```

    Args:
        masks (`dict[str, torch.Tensor]`, `MagnitudePruningCallback` or `PrunedModel`, *optional*): the masks, or
            what holds them, read at train begin; names are the trained model's parameter names. Defaults to the
            pruning callback of the same Trainer (what `restore_callback_states_from_checkpoint=True` rebuilds this
            callback with). A pruning callback in the same Trainer must come before this one and have finished its
            schedule by then.
        bits (`int`, *optional*, defaults to 4): 1..8, for `2**bits` shared values per weight.
        learning_rate (`float`, *optional*): the centroids' SGD learning rate (finite, > 0); defaults to the
            optimizer's.
        max_iter (`int`, *optional*, defaults to 100): most k-means iterations per weight (>= 1).

    Raises:
        ValueError: bad `bits`, `learning_rate`, `max_iter` or `masks`, or a pruning callback that prunes after
            training begins (here, before it changes the model); at train begin, no masks yet or a pruning schedule
            still running (a resumed run), or no `masks` and no pruning callback before this one in the Trainer
            (the error names one that comes after it).
    """

    def __init__(self, masks: Any = None, bits: int = 4, learning_rate: float | None = None,
                 max_iter: int = 100) -> None:
        check_quantizer_arguments(bits, learning_rate, max_iter)
        if not (masks is None or isinstance(masks, Mapping) or hasattr(masks, "masks")):
            raise ValueError(f"`masks` must be a dict of bool masks, a MagnitudePruningCallback or a PrunedModel (or "
                             f"None: the Trainer's pruning callback); got {type(masks).__name__} {masks!r}.")
        if isinstance(masks, MagnitudePruningCallback) and masks.prunes_after_train_begin():
            raise ValueError(_STILL_PRUNING.format(f"{type(masks).__name__} prunes after training begins "
                                                   f"(schedule {masks.config.schedule!r}, start_step "
                                                   f"{masks.config.start_step})"))
        self.source = masks
        self.bits = bits
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.quantizer: TrainedQuantizer | None = None
        self._training: tuple[TrainingArguments, TrainerState] | None = None  # from on_train_begin to on_train_end
        self._written_early: str | None = None  # the folder state() wrote the codebook into
        self._init_state: TrainerState | None = None  # the Trainer's state at its construction (see `_masks`)

    @property
    def quantized(self) -> dict[str, QuantizedWeight]:
        """Parameter name -> `QuantizedWeight` (for `save_deep_compressed`); empty before training starts."""
        return self.quantizer.quantized if self.quantizer is not None else {}

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._init_state = state

    def _masks(self, state: TrainerState) -> Mapping[str, torch.Tensor]:
        source = self.source if self.source is not None else pruning_callback_of(state)
        # train() starts from a new TrainerState, which the pruning callback claims in its on_train_begin; the
        # Trainer's first state holds its claim from on_init_end, whatever the callbacks' order
        later = None if source is not None or self._init_state is None else pruning_callback_of(self._init_state)
        if later is not None:
            raise ValueError(f"{type(later).__name__} comes after QuantizationCallback in the Trainer's callbacks: "
                             "put it before, so that its masks are final when QuantizationCallback takes them.")
        if source is None:
            raise ValueError("QuantizationCallback has no `masks` and its Trainer no pruning callback to take them "
                             "from: pass the masks, or a pruning callback before QuantizationCallback.")
        if isinstance(source, MagnitudePruningCallback) and source.pruner is None:
            raise ValueError(f"{type(source).__name__} has not begun training when QuantizationCallback needs "
                             "its masks: put it before QuantizationCallback in the Trainer's callbacks. (With "
                             "TrainingArguments(restore_callback_states_from_checkpoint=True) the Trainer replaces it "
                             "by a new instance: give QuantizationCallback no masks, and it takes those of the "
                             "Trainer's pruning callback.)")
        pruner = getattr(source, "pruner", None)
        if pruner is not None and pruner.target_sparsity < pruner.schedule.final:
            raise ValueError(_STILL_PRUNING.format(f"sparsity {pruner.target_sparsity:.4f} of "
                                                   f"{pruner.schedule.final}"))
        return source if isinstance(source, Mapping) else source.masks

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        self.quantizer = TrainedQuantizer(model, self.bits, self.learning_rate, self.max_iter)
        self._training, self._written_early = (args, state), None
        if state.global_step > 0:
            path = find_checkpoint_file(args, state, QUANTIZATION_STATE_NAME, type(self).__name__)
            self._load_state(path, args, state, state.global_step)
            logger.info("Restored %d quantized weights from %s.", len(self.quantized), path)
        else:
            self.quantizer.quantize_(self._masks(state))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._training = None
        best = state.best_model_checkpoint
        if self.quantizer is None or not args.load_best_model_at_end or best is None:
            return
        # the Trainer has loaded that checkpoint's weights: `quantized` must be their codebook, not the last step's
        path = os.path.join(best, QUANTIZATION_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning("The best checkpoint %s has no %s: `quantized` is the last step's, not the codebook of "
                           "the weights the Trainer loaded from it.", best, QUANTIZATION_STATE_NAME)
            return
        self._load_state(path, args, state)
        logger.info("Loaded the quantized weights of the best checkpoint %s.", best)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        self.quantizer.step_(optimizer)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        self.quantizer.write_weights_()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        written, self._written_early = self._written_early, None
        if self.quantized and args.should_save:  # where the Trainer writes the checkpoint
            folder = checkpoint_folder(args, state)
            if folder != written:
                self._save_state(folder, state)

    def state(self) -> dict[str, Any]:
        # the Trainer calls this while it writes a checkpoint: the codebook goes in with the weights (see
        # `checkpoint_being_written`); what it returns rebuilds the callback without masks
        # (restore_callback_states_from_checkpoint), which `_load_state` resumes without
        folder = checkpoint_being_written(*self._training) if self._training is not None and self.quantized else None
        if folder is not None:
            self._save_state(folder, self._training[1])
            self._written_early = folder
        return {"args": {"bits": self.bits, "learning_rate": self.learning_rate, "max_iter": self.max_iter},
                "attributes": {}}

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        # the Trainer uploads a checkpoint before on_save: the clusters go in first (see MagnitudePruningCallback)
        folder = checkpoint_being_pushed(args, state, QUANTIZATION_STATE_NAME) if self.quantized else None
        if folder is not None:
            self._save_state(folder, state)

    def _load_state(self, path: str, args: TrainingArguments, state: TrainerState,
                    global_step: int | None = None) -> None:
        """Takes over the codebook of a checkpoint's `quantization_state.safetensors` (checked against the masks,
        then decoded), once it is known to be the codebook of the weights the Trainer loaded from that checkpoint.

        Raises:
            ValueError: when the file was written at another step than `global_step` (that of a resume; None for
                the best checkpoint), or the loaded weights are not its values (see `mismatch_causes`).
        """
        # a callback rebuilt by restore_callback_states_from_checkpoint may have no masks, nor yet a pruning callback
        # to take them from (the Trainer adds the rebuilt ones in name order): the file holds the positions
        rebuilt = self.source is None and pruning_callback_of(state) is None and global_step is not None
        quantized, _, metadata = read_deep_compressed(path, None if rebuilt else self._masks(state))
        saved_step = metadata.get("global_step")
        differing = self.quantizer.differing_weights(quantized)
        if (global_step is not None and saved_step != global_step) or differing:
            found = (f"written at step {saved_step}, resuming at step {global_step}" if differing == [] else
                     f"{len(differing)} weights, such as {differing[0]}, are not its values")
            raise ValueError(f"{path} is not the codebook of the checkpoint the Trainer loaded ({found}). "
                             f"{mismatch_causes(args, state, global_step is None or isinstance(args.resume_from_checkpoint, str))}")
        self.quantizer.load_quantized_(quantized)

    def _save_state(self, folder: str, state: TrainerState) -> None:
        save_deep_compressed(os.path.join(folder, QUANTIZATION_STATE_NAME), self.quantized, {},
                             {"global_step": state.global_step})

"""Knowledge distillation from a dense teacher while the student is pruned: `DistillationTrainer`.

Hinton et al. 2015: the student also matches the teacher's output distribution softened by a temperature `T`,
`T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`, which carries more signal per example than the hard label. The
peers' reference numbers for pruned BERTs (movement pruning, Sanh et al. 2020; Intel Neural Compressor) are
distilled from the dense fine-tuned model; this gives hf_prune's callbacks the same recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..validation import check_number


IGNORE_INDEX = -100  # the label of positions no loss is computed on (padding, prompt tokens)


#: The temperatures `DistillationTrainer` accepts (Hinton et al. use 1..20).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """`T² · KL(softmax(teacher / T) ‖ softmax(student / T))` over the last dimension, averaged over the rows.

    `T²` keeps the gradient scale independent of `T` (Hinton et al. 2015). `mask` (the logits' leading shape,
    True = counted) leaves rows out of the average: padding positions of token-level outputs.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_row = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return per_row.mean() * temperature ** 2
    mask = mask.to(torch.bool)
    return per_row[mask].sum() / mask.sum().clamp(min=1) * temperature ** 2


def row_mask(inputs: Mapping[str, Any], leading_shape: torch.Size, is_encoder_decoder: bool) -> torch.Tensor | None:
    """Which rows of token-level logits count: the decoder's attention mask (or labels not `IGNORE_INDEX`) for an
    encoder-decoder, the attention mask otherwise; None when no mask has the logits' leading shape (sequence-level
    outputs, e.g. classification or question-answering start/end logits, count every row)."""
    if is_encoder_decoder:
        mask = inputs.get("decoder_attention_mask")
        if mask is None and inputs.get("labels") is not None:
            mask = inputs["labels"] != IGNORE_INDEX
    else:
        mask = inputs.get("attention_mask")
    return mask if torch.is_tensor(mask) and mask.shape == leading_shape else None


def logit_fields(outputs: Mapping[str, Any]) -> list[str]:
    """The output fields distilled: every tensor whose name ends in `logits` (`logits`, `start_logits`, ...)."""
    return [key for key, value in outputs.items() if key.endswith("logits") and torch.is_tensor(value)]


class DistillationTrainer(Trainer):
    """A `Trainer` whose training loss is `alpha · distillation + (1 - alpha) · task loss`, from a frozen teacher.

    The teacher (typically the dense model fine-tuned on the same task) runs without gradients on each training
    batch. Every logits field of the outputs (`logits`; `start_logits` and `end_logits` for question answering)
    is distilled with `distillation_loss` (padding positions of token-level outputs left out, `row_mask`) and the
    fields are averaged. Evaluation and prediction report the task
    loss only. Use it with any pruning callback:

    ```python
    from hf_prune import MagnitudePruningCallback, PruningConfig
    from hf_prune import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=dense_fine_tuned, temperature=2.0, alpha=0.5,
                                  args=args, train_dataset=ds,
                                  callbacks=[MagnitudePruningCallback(PruningConfig(final_sparsity=0.8))])
    ```

    Both losses are per-batch means and the sum is divided by the gradient accumulation steps, as the Trainer does
    for a model without loss kwargs. The teacher is moved to the training device and kept whole on every process:
    it is not sharded by FSDP or DeepSpeed.

    Args:
        teacher_model (`torch.nn.Module`): the frozen teacher; same inputs and output fields as the student.
        temperature (`float`, *optional*, defaults to `2.0`): the softening temperature `T`, in `[0.01, 100]`
            (outside it the softened distributions under- or overflow in float32, and the loss is NaN).
        alpha (`float`, *optional*, defaults to `0.5`): weight of the distillation term, in `[0, 1]`.
        *args, **kwargs: the `Trainer`'s.
    """

    loss_is_scaled_for_ga = False  # both terms are per-batch means

    def __init__(self, *args: Any, teacher_model: torch.nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 **kwargs: Any) -> None:
        if not isinstance(teacher_model, torch.nn.Module):
            raise ValueError(f"`teacher_model` must be a torch.nn.Module; got {type(teacher_model).__name__}.")
        check_number("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        check_number("alpha", alpha, 0.0, 1.0)
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        teacher_inputs = dict(inputs)  # before the Trainer may pop "labels"; an encoder-decoder needs them
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True)  # per-batch mean
        with torch.no_grad():
            teacher_outputs = self.teacher(**teacher_inputs)
        fields = logit_fields(outputs)
        if not fields:
            raise ValueError(f"The student's outputs have no `*logits` field to distill; got {list(outputs)}.")
        missing = [key for key in fields if key not in teacher_outputs]
        if missing:
            raise ValueError(f"The teacher's outputs lack {missing}; it must be the same kind of model as the "
                             f"student (got fields {list(teacher_outputs)}).")
        mismatched = [f"{key}: student {tuple(outputs[key].shape)}, teacher {tuple(teacher_outputs[key].shape)}"
                      for key in fields if outputs[key].shape != teacher_outputs[key].shape]
        if mismatched:  # kl_div would broadcast a one-label teacher over the student's labels without a word
            raise ValueError(f"The teacher's logits differ in shape from the student's ({'; '.join(mismatched)}): "
                             "distillation compares them entry by entry, so the teacher must predict the same "
                             "labels (num_labels) or vocabulary as the student.")
        encoder_decoder = bool(getattr(getattr(self.teacher, "config", None), "is_encoder_decoder", False))
        distill = sum(distillation_loss(outputs[key], teacher_outputs[key], self.temperature,
                                        row_mask(teacher_inputs, outputs[key].shape[:-1], encoder_decoder))
                      for key in fields) / len(fields)
        loss = self.alpha * distill + (1.0 - self.alpha) * task_loss
        return (loss, outputs) if return_outputs else loss

"""See et al. 2016's retraining recipe after pruning: a smaller learning rate, halved every two epochs."""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainingArguments

from ..validation import check_int, check_number


def _halving(step: int, steps_per_halving: int) -> float:
    return 0.5 ** (step // steps_per_halving)


def get_see_retraining_schedule(optimizer: torch.optim.Optimizer, num_update_steps_per_epoch: int,
                                halve_every_epochs: int = 2, last_epoch: int = -1) -> LambdaLR:
    """See et al. 2016's retraining schedule: the learning rate halved every `halve_every_epochs` epochs.

    A `LambdaLR` like transformers' `get_*_schedule` functions (stepped once per optimizer step, saved and restored
    with Trainer checkpoints): `lr = lr_0 · 0.5 ** (step // (halve_every_epochs · num_update_steps_per_epoch))`.
    With `see_retraining_arguments` (the smaller starting learning rate and fewer epochs) and the Trainer:

    ```python
    args = see_retraining_arguments(args)                 # lr_0 = args.learning_rate / 2, 4 epochs
    trainer = Trainer(model=pruned_model, args=args, train_dataset=ds, callbacks=[pruning_callback])
    trainer.create_optimizer()                            # the Trainer's own optimizer (weight-decay groups, ...)
    steps_per_epoch = math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps)
    trainer.lr_scheduler = get_see_retraining_schedule(trainer.optimizer, steps_per_epoch)
    trainer.train()
    ```

    (or `Trainer(..., optimizers=(optimizer, get_see_retraining_schedule(optimizer, steps_per_epoch)))` with an
    optimizer of your own).

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer whose learning rates are scheduled.
        num_update_steps_per_epoch (`int`): optimizer steps per epoch (>= 1).
        halve_every_epochs (`int`, *optional*, defaults to 2): epochs between two halvings (>= 1).
        last_epoch (`int`, *optional*, defaults to -1): the index of the last step when resuming by hand.
    """
    check_int("num_update_steps_per_epoch", num_update_steps_per_epoch, 1)
    check_int("halve_every_epochs", halve_every_epochs, 1)
    check_int("last_epoch", last_epoch, -1)
    halving = functools.partial(_halving, steps_per_halving=halve_every_epochs * num_update_steps_per_epoch)
    return LambdaLR(optimizer, halving, last_epoch)


def see_retraining_arguments(args: TrainingArguments, learning_rate_factor: float = 0.5,
                             num_train_epochs: float = 4.0) -> TrainingArguments:
    """A copy of `args` for See et al. 2016's retraining: a smaller learning rate (`learning_rate_factor` times
    that of `args`; See et al. restart from half the original rate) for fewer epochs (`max_steps` unset, no
    warmup). The halving every 2 epochs is `get_see_retraining_schedule`'s.

    Args:
        args (`TrainingArguments`): the arguments of the original training.
        learning_rate_factor (`float`, *optional*, defaults to 0.5): in (0, 1].
        num_train_epochs (`float`, *optional*, defaults to 4.0): epochs of retraining (> 0).
    """
    check_number("learning_rate_factor", learning_rate_factor, 0.0, 1.0, strict_minimum=True)
    check_number("num_train_epochs", num_train_epochs, 0.0, strict_minimum=True)
    return dataclasses.replace(args, learning_rate=args.learning_rate * learning_rate_factor,
                               num_train_epochs=num_train_epochs, max_steps=-1, warmup_steps=0)

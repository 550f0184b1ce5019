"""`PruningArguments`: `PruningConfig`'s fields as command-line options for `transformers.HfArgumentParser`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import CLASS_GRANULARITIES, CRITERIA, SCHEDULES, SCHEMES, PruningConfig
from .schedules import SparsitySchedule


_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(PruningConfig)}


def _option(name: str, help: str | None = None, **metadata: Any) -> Any:
    """A field with `PruningConfig.<name>`'s default and help (or `help`), plus argparse `metadata` (`choices`)."""
    config_field = _CONFIG_FIELDS[name]
    return field(default=config_field.default,
                 metadata={"help": help or config_field.metadata["help"], **metadata})


@dataclass
class PruningArguments:
    """Pruning options for scripts that parse their arguments with `HfArgumentParser`.

    Every option carries the name, default and meaning of the `PruningConfig` field it sets (see there);
    `--prune false` or `--final_sparsity 0` trains the dense model instead.

    ```python
    from transformers import HfArgumentParser, TrainingArguments
    from hf_prune import MagnitudePruningCallback
    from hf_prune.arguments import PruningArguments

    training_args, pruning_args = HfArgumentParser((TrainingArguments, PruningArguments)).parse_args_into_dataclasses()
    callbacks = [MagnitudePruningCallback(pruning_args.to_config())] if pruning_args.enabled else []
    ```
    """

    prune: bool = field(default=True, metadata={"help": "Prune while fine-tuning; `--prune false` (or "
                                                        "`--final_sparsity 0`) fine-tunes the dense model."})
    initial_sparsity: float = _option("initial_sparsity")
    final_sparsity: float = _option("final_sparsity")
    schedule: str = _option("schedule", "How sparsity grows: oneshot (all at start_step), iterative (equal steps "
                                        "every pruning_frequency) or cubic (Zhu & Gupta 2017).", choices=SCHEDULES)
    start_step: int = _option("start_step")
    end_step: int | None = _option("end_step", "Optimizer step where final_sparsity is reached; None: 3/4 of the "
                                               "run's steps, at most start_step + 10000.")
    pruning_frequency: int | None = _option("pruning_frequency", "Optimizer steps between pruning events; "
                                                                 "None: 1001 per 10000 steps of the schedule.")
    scheme: str = _option("scheme", "How weights are ranked (See et al. 2016): all together (class-blind), the same "
                                    "fraction per weight class (class-uniform) or |w| < lambda * std per class "
                                    "(class-distribution).", choices=SCHEMES)
    criterion: str = _option("criterion", choices=CRITERIA)
    fisher_steps: int = _option("fisher_steps")
    class_granularity: str = _option("class_granularity", choices=CLASS_GRANULARITIES)
    target_modules: list[str] | None = _option(
        "target_modules", "Module names or dotted name suffixes to prune instead of the default (the Linear layers "
                          "inside the Transformer blocks), e.g. `query key value`.")
    exclude_modules: list[str] | None = _option("exclude_modules", "Module names or dotted name suffixes never "
                                                                   "pruned, e.g. `output.dense`.")
    prune_head: bool = _option("prune_head")

    def __post_init__(self) -> None:
        if self.enabled:
            self.to_config()

    @property
    def enabled(self) -> bool:
        """Whether the run prunes: `prune` is set and `final_sparsity` is above 0."""
        return self.prune and self.final_sparsity > 0

    def to_config(self, max_steps: int | None = None) -> PruningConfig:
        """The `PruningConfig` these arguments describe.

        Args:
            max_steps (`int`, *optional*): the run's number of optimizer steps; when given, also checks that the
                schedule fits in it (as the callback would at the start of training).

        Raises:
            ValueError: naming the option, its value and what it accepts.
        """
        config = PruningConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                  if f.name in _CONFIG_FIELDS})
        if max_steps is not None:
            SparsitySchedule.from_config(config, max_steps)
        return config

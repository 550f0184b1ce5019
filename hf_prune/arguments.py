"""`PruningArguments`: `PruningConfig`'s fields as command-line options for `transformers.HfArgumentParser`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .callbacks import MagnitudePruningCallback
from .config import CLASS_GRANULARITIES, PruningConfig
from .criteria import CRITERIA
from .masks import SCHEMES
from .methods.rpp import PENALTY_SCHEDULES, RPPCallback, RPPConfig
from .schedules import SCHEDULES
from .validation import check_bool, check_int, missing_attribute


#: `--method`: the config class the options build and the callback that runs it.
METHODS: dict[str, tuple[type[PruningConfig], type[MagnitudePruningCallback]]] = {
    "magnitude": (PruningConfig, MagnitudePruningCallback),
    "rpp": (RPPConfig, RPPCallback),
}
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(PruningConfig)}
#: The fields `RPPConfig` adds; `schedule` keeps `PruningConfig`'s default (cubic) for both methods.
_RPP_FIELDS = {f.name: f for f in dataclasses.fields(RPPConfig) if f.name not in _CONFIG_FIELDS}


def _option(name: str, help: str | None = None, **metadata: Any) -> Any:
    """A field with the default and help (or `help`) of `PruningConfig.<name>` (`RPPConfig.<name>` for the RPP
    options, whose help is prefixed with `rpp:`), plus argparse `metadata` (`choices`)."""
    config_field = _CONFIG_FIELDS.get(name) or _RPP_FIELDS[name]
    help = help or config_field.metadata["help"]
    return field(default=config_field.default,
                 metadata={"help": f"rpp: {help}" if name in _RPP_FIELDS else help, **metadata})


@dataclass
class PruningArguments:
    """Pruning options for scripts that parse their arguments with `HfArgumentParser`.

    Every option carries the name, default and meaning of the `PruningConfig` field it sets (see there);
    `--prune false` or `--final_sparsity 0` trains the dense model instead (the options are checked all the same,
    so a NaN or negative `--final_sparsity` is an error, never a dense run). `--method rpp` runs Reweighted
    Proximal Pruning (`RPPCallback`) and takes the `RPPConfig` options `--penalty`, `--penalty_schedule`,
    `--epsilon` and `--reweight_every`; the masks then grow along `--schedule` over the proximal window (cubic
    by default, `oneshot` for Guo et al.'s single hard prune at `end_step`). Resuming from a checkpoint trained
    under options that prune differently is an error unless `--override_checkpoint_config` is set.

    ```python
    from transformers import HfArgumentParser, TrainingArguments
    from hf_prune import PruningArguments

    training_args, pruning_args = HfArgumentParser((TrainingArguments, PruningArguments)).parse_args_into_dataclasses()
    callbacks = [pruning_args.to_callback()] if pruning_args.enabled else []
    ```
    """

    prune: bool = field(default=True, metadata={"help": "Prune while fine-tuning; `--prune false` (or "
                                                        "`--final_sparsity 0`) fine-tunes the dense model."})
    method: str = field(default="magnitude", metadata={
        "help": "magnitude: MagnitudePruningCallback; rpp: Reweighted Proximal Pruning (RPPCallback, Guo et al. "
                "2019), with the rpp: options.", "choices": tuple(METHODS)})
    initial_sparsity: float = _option("initial_sparsity")
    final_sparsity: float = _option("final_sparsity")
    schedule: str = _option("schedule", "How sparsity grows: oneshot (all at once: at start_step; with --method "
                                        "rpp at end_step), iterative (equal steps every pruning_frequency) or "
                                        "cubic (Zhu & Gupta 2017).", choices=SCHEDULES)
    start_step: int = _option("start_step", "Optimizer step of the first pruning event (with --method rpp: the start "
                                            "of the proximal window; a oneshot RPP prunes at end_step).")
    end_step: int | None = _option("end_step", "Optimizer step where final_sparsity is reached; None: 3/4 of the "
                                               "run's steps, at most start_step + 10000.")
    pruning_frequency: int | None = _option("pruning_frequency", "Optimizer steps between pruning events; "
                                                                 "None: 1001 per 10000 steps of the schedule.")
    scheme: str = _option("scheme", "How weights are ranked (See et al. 2016): all together (class-blind), the same "
                                    "fraction per weight class (class-uniform) or |w| < lambda * std per class "
                                    "(class-distribution).", choices=SCHEMES)
    criterion: str = _option("criterion", choices=tuple(CRITERIA))
    fisher_steps: int = _option("fisher_steps")
    class_granularity: str = _option("class_granularity", choices=CLASS_GRANULARITIES)
    target_modules: list[str] | None = _option(
        "target_modules", "Module names or dotted name suffixes to prune instead of the default (the Linear layers "
                          "inside the Transformer blocks; outside them only with --prune_head), e.g. `query key "
                          "value`. In a JSON / YAML file a single string is a regular expression over the whole "
                          "module name.")
    exclude_modules: list[str] | None = _option("exclude_modules", "Module names or dotted name suffixes never "
                                                                   "pruned, e.g. `output.dense` (a single string in a "
                                                                   "JSON / YAML file: a regular expression).")
    prune_head: bool = _option("prune_head")
    structure: list[str] = field(default_factory=lambda: ["unstructured"], metadata={
        "help": "What is pruned together: unstructured (single weights), neurons (feed-forward neurons), heads "
                "(attention heads), or `neurons heads`; with --scheme class-uniform the saved model can be shrunk "
                "to a smaller standard one: PrunedModel.from_pretrained(output_dir).shrink().", "nargs": "+"})
    penalty: float = _option("penalty")
    penalty_schedule: str = _option("penalty_schedule", "λ on every step of the window (constant) or warmed up "
                                                        "linearly to λ at end_step (linear).",
                                    choices=PENALTY_SCHEDULES)
    epsilon: float = _option("epsilon")
    reweight_every: int = _option("reweight_every")
    override_checkpoint_config: bool = field(default=False, metadata={
        "help": "With --resume_from_checkpoint: continue from the checkpoint's masks under these options even where "
                "they prune differently from those it was trained with (without it, that is an error)."})

    def __post_init__(self) -> None:
        self.to_config()  # every option, also for a dense run: `--final_sparsity nan` or `-0.5` is an error

    @property
    def enabled(self) -> bool:
        """Whether the run prunes: `prune` is set and `final_sparsity` is above 0.

        Raises:
            ValueError: as `to_config()`, for options changed since construction into values it refuses (a NaN
                or negative `final_sparsity` is an error, not a dense run).
        """
        self.to_config()
        return self.prune and self.final_sparsity > 0

    def to_config(self, max_steps: int | None = None) -> PruningConfig:
        """The `PruningConfig` (`RPPConfig` for `--method rpp`) these arguments describe.

        Args:
            max_steps (`int`, *optional*): the run's number of optimizer steps; when given, also checks that the
                schedule fits in it (as the callback would at the start of training).

        Raises:
            ValueError: naming the option, its value and what it accepts; also for an `rpp:` option set away
                from its default while `method` is not `rpp`. The options are checked whether or not the run
                prunes (`--prune false` or `--final_sparsity 0` with a bad option is still an error).
        """
        check_int("max_steps", max_steps, 1, optional=True)
        check_bool("prune", self.prune)
        check_bool("override_checkpoint_config", self.override_checkpoint_config)
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}; got {self.method!r}.")
        config_class = METHODS[self.method][0]
        if config_class is not RPPConfig:
            changed = [f"--{name}" for name, rpp_field in _RPP_FIELDS.items()
                       if getattr(self, name) != rpp_field.default]
            if changed:
                raise ValueError(f"{', '.join(changed)} set with `method` {self.method!r}; these options apply "
                                 "to `method` 'rpp' only.")
        names = {f.name for f in dataclasses.fields(config_class)}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        config = config_class(**values)
        if max_steps is not None:
            METHODS[self.method][1].check_schedule(config, max_steps)
        return config

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the arguments lack: a Trainer given them as a callback asks for its events.
        raise missing_attribute(self, name, "`pruning_args.to_callback()`")

    def to_callback(self, max_steps: int | None = None) -> MagnitudePruningCallback:
        """The callback of `method` (`MagnitudePruningCallback` or `RPPCallback`) with `to_config(max_steps)` and
        `override_checkpoint_config`."""
        return METHODS[self.method][1](self.to_config(max_steps), self.override_checkpoint_config)

"""What `run_glue.py` and `run_squad.py` share: model options, input errors, logging, training and the final save."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import datasets
import huggingface_hub
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningArguments


logger = logging.getLogger(__name__)


class InputError(Exception):
    """Bad command-line input (a missing file, an unknown task, ...): one line on stderr and exit code 2."""


@contextmanager
def exit_on_input_error(prog: str) -> Iterator[None]:
    """Turns an `InputError` raised inside into `prog: error: <message>` on stderr and `SystemExit(2)`."""
    try:
        yield
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune (the names of transformers' example scripts)."""

    model_name_or_path: str = field(metadata={"help": "Path to a pretrained model or its Hub id."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None,
                                       metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloads from the Hub are stored."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})

    def hub_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every `from_pretrained` call."""
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "token": self.token}


@dataclass
class ScriptArguments:
    """A script's parsed options; `push_to_hub` is `--push_to_hub`, taken over from `training` (see `parse_args`)."""

    model: ModelArguments
    data: Any
    training: TrainingArguments
    pruning: PruningArguments
    push_to_hub: bool


class _Parser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line (argparse would print the usage of ~150 options first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help).\n")


def parse_args(prog: str, data_class: type, argv: Sequence[str] | None) -> ScriptArguments:
    """`ModelArguments`, `data_class`, `TrainingArguments` and `PruningArguments` from `argv` (or one `.json` file).

    `--push_to_hub` is taken over from the Trainer, which would push every checkpoint without the masks: the
    returned `TrainingArguments` have it off, and `train_evaluate_save` pushes the pruned model once at the end.

    Raises:
        InputError: when an option's value is rejected (argparse's own errors exit with code 2 already).
    """
    parser = _Parser((ModelArguments, data_class, TrainingArguments, PruningArguments), prog=prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        else:
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, OSError) as err:
        raise InputError(str(err).strip().splitlines()[0]) from None
    args = ScriptArguments(*parsed, push_to_hub=parsed[2].push_to_hub)
    if not (args.training.do_train or args.training.do_eval):
        raise InputError("nothing to do: pass --do_train and/or --do_eval.")
    for option in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args.training, option)  # TrainingArguments accepts 0: the first batch (or step) would fail
        if value < 1:
            raise InputError(f"--{option} {value}: must be >= 1.")
    resume = args.training.resume_from_checkpoint
    if args.training.do_train and resume is not None and not os.path.isdir(resume):
        raise InputError(f"--resume_from_checkpoint {resume}: no such folder.")
    if args.push_to_hub and not (args.training.do_train and args.pruning.enabled):
        raise InputError("--push_to_hub uploads the pruned model, so it needs --do_train with pruning on "
                         "(not --prune false or --final_sparsity 0).")
    if args.push_to_hub and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise InputError("--push_to_hub with HF_HUB_OFFLINE set: the upload at the end would fail after training; "
                         "unset HF_HUB_OFFLINE, or push the saved folder later (PrunedModel.push_to_hub).")
    args.training.push_to_hub = False
    return args


def setup_logging(training_args: TrainingArguments, script_logger: str) -> None:
    """transformers' example-script logging: to stdout, at the process's log level, for the `script_logger`,
    these helpers and hf_prune (its pruning events)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for name in (script_logger, __name__, "hf_prune"):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info("Training/evaluation parameters %s", training_args)


def check_file(option: str, path: str, suffixes: tuple[str, ...]) -> None:
    """Raises `InputError` unless `path` (given as `--option`) is an existing file with one of `suffixes`."""
    if not os.path.isfile(path):
        raise InputError(f"--{option} {path}: no such file.")
    if not path.endswith(suffixes):
        raise InputError(f"--{option} {path}: unsupported file type; accepted: {', '.join(suffixes)}.")


def load_hub_dataset(name: str, config_name: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    """`datasets.load_dataset(name, config_name)`; `InputError` when it cannot be loaded (offline, unknown name)."""
    try:
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as err:  # whatever `datasets` raises for an unreachable Hub or an unknown dataset
        raise InputError(f"cannot load {name!r}{f' ({config_name})' if config_name else ''} from the Hub "
                         f"({type(err).__name__}: {str(err).strip().splitlines()[0]}); pass --train_file / "
                         "--validation_file.") from None


def first_rows(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    """The first `count` rows of `dataset` (all of them for `None` or a larger `count`)."""
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def require_splits(training_args: TrainingArguments, train: object | None, validation: object | None) -> None:
    """Raises `InputError` when `--do_train` has no training data or `--do_eval` no validation data."""
    if training_args.do_train and train is None:
        raise InputError("--do_train needs training data: pass --train_file (or a Hub dataset).")
    if training_args.do_eval and validation is None:
        raise InputError("--do_eval needs validation data: pass --validation_file (or a Hub dataset).")


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The (fast) tokenizer of `--tokenizer_name` or `--model_name_or_path`; `InputError` when it cannot load."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(name, use_fast=True, **model_args.hub_kwargs())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a tokenizer from {name!r}: {str(err).strip().splitlines()[0]}") from None


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """The config of `--config_name` or `--model_name_or_path`; `InputError` when it cannot load."""
    name = model_args.config_name or model_args.model_name_or_path
    try:
        return AutoConfig.from_pretrained(name, **model_args.hub_kwargs())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a model config from {name!r}: {str(err).strip().splitlines()[0]}") from None


def pruning_callbacks(script_args: ScriptArguments, num_train_features: int) -> list[MagnitudePruningCallback]:
    """`[callback]` for a pruning run (`[]` for a dense one): `MagnitudePruningCallback`, or `RPPCallback` for
    `--method rpp`, its schedule checked against the number of optimizer steps the Trainer will take over
    `num_train_features` rows; `InputError` if it cannot fit.
    """
    training_args, pruning_args = script_args.training, script_args.pruning
    if not (training_args.do_train and pruning_args.enabled):
        return []
    max_steps = training_args.max_steps
    if max_steps <= 0:
        rounding = math.floor if training_args.dataloader_drop_last else math.ceil
        batches = rounding(num_train_features / (training_args.train_batch_size * training_args.world_size))
        max_steps = math.ceil(training_args.num_train_epochs
                              * max(1, math.ceil(batches / training_args.gradient_accumulation_steps)))
    try:
        callback = pruning_args.to_callback(max_steps=max_steps)
    except ValueError as err:
        raise InputError(str(err)) from None
    report_train_begin_errors_as_input(callback)
    logger.info("Pruning over %d optimizer steps with %s", max_steps, callback.config)
    return [callback]


def report_train_begin_errors_as_input(callback: MagnitudePruningCallback) -> None:
    """Makes the `ValueError`s (and `FileNotFoundError`s) `callback` raises at train begin `InputError`s.

    Those are the checks that need the model or the checkpoint, made before the first optimizer step:
    `--target_modules` / `--exclude_modules` that match no layer of the model, a `--resume_from_checkpoint` folder
    pruned under other options (without `--override_checkpoint_config`) or without masks, and the like. Run the
    training inside `exit_on_input_error` to get them as one line and exit code 2.
    """
    on_train_begin = callback.on_train_begin

    @functools.wraps(on_train_begin)
    def checked_on_train_begin(*args: Any, **kwargs: Any) -> None:
        try:
            on_train_begin(*args, **kwargs)
        except (ValueError, FileNotFoundError) as err:
            raise InputError(str(err).strip().splitlines()[0]) from None

    callback.on_train_begin = checked_on_train_begin


def train_evaluate_save(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, script_args: ScriptArguments,
                        num_train: int, num_eval: int) -> dict[str, float]:
    """Trains (`--do_train`), evaluates (`--do_eval`), saves and, with `--push_to_hub`, uploads the result.

    A pruning run saves `PrunedModel.from_trainer(trainer)` (model, masks, pruning config, model card) and the
    tokenizer to `output_dir`, a dense run the model and tokenizer; the metrics of both splits go to
    `all_results.json`. Returns those metrics.
    """
    args = trainer.args
    results: dict[str, float] = {}
    if args.do_train:
        metrics = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint).metrics
        metrics["train_samples"] = num_train
        if script_args.pruning.enabled:  # train() returns the Trainer's own metrics, without the callback's logs
            [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MagnitudePruningCallback)]
            metrics["sparsity"] = callback.pruner.sparsity()  # a collective under FSDP / ZeRO-3: every rank is here
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        results.update(metrics)
    if args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics["eval_samples"] = num_eval
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if args.do_train:
        trainer.save_state()  # after the evaluation: its metrics are in trainer_state.json's log_history too
    if not args.do_train:
        return results
    if not script_args.pruning.enabled:
        trainer.save_model()  # the model and the tokenizer
        return results
    pruned = PrunedModel.from_trainer(trainer)
    if trainer.is_world_process_zero():
        pruned.save_pretrained(args.output_dir, processing_class=tokenizer)
        logger.info("Saved the pruned model to %s:\n%s", args.output_dir, pruned.sparsity_report())
        if script_args.push_to_hub:
            repo_id = args.hub_model_id or Path(args.output_dir).absolute().name
            commit = pruned.push_to_hub(repo_id, private=args.hub_private_repo, token=args.hub_token,
                                        revision=args.hub_revision, processing_class=tokenizer)
            logger.info("Pushed the pruned model and its tokenizer to %s", commit.repo_url)
    return results

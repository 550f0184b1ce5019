"""The `hf-prune` command: sparsity reports of saved models and curves of pruning runs.

```
hf-prune report out/pruned --png sparsity.png    # per-layer table of a PrunedModel.save_pretrained folder
hf-prune report bert-base-uncased                 # zeros of a plain transformers model (folder or Hub repo)
hf-prune plot out/run --metric eval_accuracy      # sparsity / loss / metric curves from trainer_state.json
```
"""

from __future__ import annotations

import argparse
import os
import sys

from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import CONFIG_NAME as MODEL_CONFIG_NAME

from . import plots
from .config import PruningConfig
from .constants import CONFIG_NAME, MASKS_NAME, TRAINER_STATE_NAME
from .hub import resolve_file
from .loading import auto_model_class, load_auto_config, load_dense, parameter_shapes
from .report import SparsityReport, sparsity_report
from .serialization import load_masks, read_json_object, read_masks_metadata, writable_target


CURVES_NAME = "pruning_curves.png"


def load_report(path_or_repo: str) -> tuple[SparsityReport, str]:
    """The sparsity report of a saved model and where its numbers come from.

    From `pruning_masks.safetensors` when the folder or repo has one (the weights are not loaded), else from
    the zeros of the model loaded as the class its `config.json` names (else `AutoModel`), so the weight names
    match those of the masks.

    Raises:
        FileNotFoundError: when `path_or_repo` is neither a model folder nor a reachable Hub repo.
        ValueError: when a file of it cannot be read (a corrupt masks or weights file, a config that is not JSON).
    """
    masks_file = resolve_file(path_or_repo, MASKS_NAME, required=False)
    if masks_file is None:
        # a Hub repo must have a config.json: requiring it names why a repo cannot be read (offline, no such repo)
        if resolve_file(path_or_repo, MODEL_CONFIG_NAME, required=not os.path.isdir(path_or_repo)) is None:
            raise FileNotFoundError(f"{path_or_repo} has neither {MASKS_NAME} nor a transformers {MODEL_CONFIG_NAME}.")
        config = load_auto_config(path_or_repo)
        return sparsity_report(load_dense(auto_model_class(config), path_or_repo, config, {})), "zero weights"
    if resolve_file(path_or_repo, CONFIG_NAME, required=False) is not None:
        config = PruningConfig.from_pretrained(path_or_repo)
    else:  # a Trainer checkpoint: the callback stores its config in the masks' metadata
        config = PruningConfig.from_dict(read_masks_metadata(masks_file).get("pruning_config") or {})
    return SparsityReport.from_masks(load_masks(masks_file, _model_shapes(path_or_repo)), config.class_granularity), \
        MASKS_NAME


def _model_shapes(path_or_repo: str) -> dict[str, tuple[int, ...]] | None:
    """The parameter shapes of the model `config.json` describes (built on the meta device, nothing allocated),
    which bound what the masks file may decode to; `None` without a config transformers knows."""
    if resolve_file(path_or_repo, MODEL_CONFIG_NAME, required=False) is None:
        return None
    try:
        return parameter_shapes(load_auto_config(path_or_repo))
    except (OSError, ValueError, ImportError, TypeError):  # e.g. remote code: the masks are reported unchecked
        return None


def find_trainer_state(output_dir: str) -> str:
    """`output_dir/trainer_state.json`, else the one of the latest `checkpoint-*` folder in `output_dir`."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"No such folder: {output_dir}")
    candidates = [output_dir, get_last_checkpoint(output_dir)]
    found = [os.path.join(c, TRAINER_STATE_NAME) for c in candidates
             if c is not None and os.path.isfile(os.path.join(c, TRAINER_STATE_NAME))]
    if not found:
        raise FileNotFoundError(f"No {TRAINER_STATE_NAME} in {output_dir} nor in its latest checkpoint-* folder.")
    return found[0]


def _check_output_file(path: str, option: str) -> None:
    """Raises before any work when `path` cannot be written: `ValueError` for an empty name or what is not a
    regular file (a folder, a device), `FileNotFoundError` when the folder to write it into does not exist."""
    if not path:
        raise ValueError(f"{option} '': give the name of the PNG file to write.")
    try:
        writable_target(path)
    except ValueError as err:
        raise ValueError(f"{option} {path}: {err}") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{option} {path}: no such folder {folder}.")


def _report(args: argparse.Namespace) -> None:
    if args.png is not None:
        _check_output_file(args.png, "--png")
    report, source = load_report(args.path)
    print(report.to_markdown() if args.markdown else report)
    if args.png is not None:
        plots.plot_sparsity_heatmap(report, args.png, title=f"{args.path}: sparsity from {source} "
                                                            f"(overall {report.overall:.1%})")
        print(f"Wrote {args.png}", file=sys.stderr)
    if source == "zero weights" and report.overall == 0:
        print("No targeted weight is zero: a dense model. A model saved from PrunedModel.shrink() is one: its "
              "pruned neurons and heads are removed, not zeroed (its config's widths are smaller).", file=sys.stderr)
    print(f"The sparsity of {args.path} counted from its {source}.", file=sys.stderr)


def _plot(args: argparse.Namespace) -> None:
    out = os.path.join(args.output_dir, CURVES_NAME) if args.out is None else args.out
    if args.out is not None:
        _check_output_file(out, "--out")
    state_file = find_trainer_state(args.output_dir)
    log_history = read_json_object(state_file, "a Trainer's state").get("log_history")
    if not isinstance(log_history, list):
        raise ValueError(f"{state_file} has no `log_history` list.")
    try:
        plots.plot_training_curves(log_history, out, args.metric, title=f"Pruning run {state_file}")
    except ValueError as err:
        raise ValueError(f"{state_file}: {err}") from None
    print(f"Wrote {out}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Inspect models pruned with hf_prune.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="Per-layer sparsity table (and heatmap) of a saved model.")
    report.add_argument("path", metavar="PATH_OR_REPO", help="A save_pretrained folder or a Hub model repo id.")
    report.add_argument("--png", metavar="FILE", help="Also write a heatmap of sparsity by layer and role.")
    report.add_argument("--markdown", action="store_true", help="Print the table as Markdown.")
    report.set_defaults(run=_report)
    plot = commands.add_parser("plot", help="Plot sparsity, loss and eval metrics of a Trainer run.")
    plot.add_argument("output_dir", metavar="OUTPUT_DIR",
                      help=f"The Trainer's output_dir (or a checkpoint) with {TRAINER_STATE_NAME}.")
    plot.add_argument("--out", metavar="FILE", help=f"PNG to write (default: OUTPUT_DIR/{CURVES_NAME}).")
    plot.add_argument("--metric", action="append",
                      help="Eval metric to plot, e.g. eval_accuracy (repeatable; default: every eval_* metric).")
    plot.set_defaults(run=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hf-prune`; returns the exit status (2 on an error, with a one-line message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError, ImportError) as err:
        print(f"hf-prune: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

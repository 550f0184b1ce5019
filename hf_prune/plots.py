"""Pictures of a pruning run: a model's sparsity by layer and role, and a training run's curves.

matplotlib is imported only when a picture is drawn (on the non-interactive Agg canvas, leaving pyplot's global
state alone), so `import hf_prune` does not need it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .report import SparsityReport
from .serialization import atomic_write
from .targets import weight_class


#: Logged `eval_*` values that measure speed, not the model.
SPEED_SUFFIXES = ("_runtime", "_per_second")
#: Above this many cells the heatmap is not annotated (the numbers would not fit).
MAX_ANNOTATED_CELLS = 600
#: Above this many weight classes the per-class curves are grey and share one legend entry.
MAX_LEGEND_CLASSES = 12


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib `Figure` drawn by the Agg backend; a clear `ImportError` when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("hf_prune's plots need matplotlib: `pip install matplotlib`.") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def _percent_axis(axis: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(1.0))


# --------------------------------------------------------------------------------------------------- labels
def split_name(name: str) -> tuple[str, str | None, str]:
    """Splits a module or weight-class name at its layer index (the first integer or `*` component).

    `"bert.encoder.layer.3.attention.self.query"` -> `("bert.encoder.layer", "3", "attention.self.query")`,
    `"encoder.block.*.layer.*.DenseReluDense.wi"` -> `("encoder.block", "*", "layer.*.DenseReluDense.wi")`.
    A name outside the indexed blocks (`"classifier"`) -> `("", None, "classifier")`.
    """
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part == "*" or part.isdigit()), None)
    if index is None:
        return "", None, name
    return ".".join(parts[:index]), parts[index], ".".join(parts[index + 1:])


def _common_prefix_length(names: Sequence[Sequence[str]]) -> int:
    """How many leading components all `names` share, keeping at least one component of each."""
    longest_allowed = max(0, min((len(n) for n in names), default=1) - 1)
    return next((i for i in range(longest_allowed) if len({n[i] for n in names}) > 1), longest_allowed)


def _distinct_parts(names: Sequence[Sequence[str]]) -> list[str]:
    """What tells dotted names apart: `model.encoder.layers`, `model.decoder.layers` -> `encoder`, `decoder`;
    all empty when the names are equal."""
    if len({tuple(n) for n in names}) <= 1:
        return [""] * len(names)
    head = _common_prefix_length(names)
    tails = [n[head:] for n in names]
    tail = _common_prefix_length([t[::-1] for t in tails])
    return [".".join(t[:len(t) - tail]) for t in tails]


def short_labels(names: Sequence[str]) -> list[str]:
    """Readable labels for module or weight-class names.

    Inside the blocks a label is the part after the layer index, without the prefix all those parts share
    (`attention.self.query`), led by the stack when there are several (`decoder: EncDecAttention.q` for T5's
    `decoder.block.*.layer.*.EncDecAttention.q`); a concrete layer index stays in the label (`3.attention.self.query`
    for per-tensor classes). Names outside the blocks are kept whole.
    """
    splits = [split_name(name) for name in names]
    in_blocks = [i for i, (_, layer, _) in enumerate(splits) if layer is not None]
    roles = [(splits[i][2] if splits[i][1] == "*" else f"{splits[i][1]}.{splits[i][2]}").split(".") for i in in_blocks]
    head = _common_prefix_length(roles)
    stacks = _distinct_parts([splits[i][0].split(".") for i in in_blocks])
    labels = list(names)
    for i, role, stack in zip(in_blocks, roles, stacks):
        labels[i] = f"{stack}: {'.'.join(role[head:])}" if stack else ".".join(role[head:])
    return labels


# -------------------------------------------------------------------------------------------------- heatmap
def sparsity_grid(report: SparsityReport) -> tuple[list[str], list[str], np.ndarray]:
    """Sparsity by layer index (rows) and weight class (columns): `(layer_labels, weight_classes, values)`.

    A cell pools every weight of that layer and role (e.g. the experts of a mixture-of-experts block); it is NaN
    where a layer has no such role. Weights outside the indexed blocks (a pruned head) form a last row `other`.
    """
    pruned: dict[tuple[str | None, str], int] = defaultdict(int)
    total: dict[tuple[str | None, str], int] = defaultdict(int)
    for row in report.layers:
        module = row.name.removesuffix(".weight")
        key = (split_name(module)[1], weight_class(module))
        pruned[key] += row.pruned
        total[key] += row.numel
    classes = list(dict.fromkeys(cls for _, cls in total))
    layers = sorted({layer for layer, _ in total if layer is not None}, key=int)
    layers += [None] if any(layer is None for layer, _ in total) else []
    values = np.full((len(layers), len(classes)), np.nan)
    for (layer, cls), numel in total.items():
        values[layers.index(layer), classes.index(cls)] = pruned[layer, cls] / numel
    return ["other" if layer is None else layer for layer in layers], classes, values


def plot_sparsity_heatmap(report: SparsityReport, path: str | os.PathLike, title: str | None = None) -> None:
    """Writes a PNG heatmap of `report`'s sparsity by layer (rows) and weight role (columns) to `path`.

    Args:
        report (`SparsityReport`): e.g. `PrunedModel.sparsity_report()` or `sparsity_report(model)`.
        path (`str`): the PNG file to write (atomically).
        title (`str`, *optional*): defaults to one stating the overall sparsity.

    Raises:
        ValueError: when the report has no weights.
    """
    if not report.layers:
        raise ValueError("The sparsity report has no weights to plot.")
    rows, classes, values = sparsity_grid(report)
    columns = short_labels(classes)
    figure = _new_figure(2.8 + 0.75 * len(columns), 2.2 + 0.32 * len(rows) + 0.06 * max(map(len, columns)))
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    colorbar = figure.colorbar(image, ax=ax)
    colorbar.set_label("sparsity (fraction of weights pruned)")
    _percent_axis(colorbar.ax.yaxis)
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("weight role")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Sparsity by layer and role (overall {report.overall:.1%})")
    stacks = [split_name(cls)[0] for cls in classes]
    for j in range(1, len(stacks)):
        if stacks[j] != stacks[j - 1]:
            ax.axvline(j - 0.5, color="white", linewidth=3)
    if values.size <= MAX_ANNOTATED_CELLS:
        for (i, j), value in np.ndenumerate(values):
            if not np.isnan(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, f"{value:.1%}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    _save_png(figure, path)


# --------------------------------------------------------------------------------------------------- curves
def _check_log_history(log_history: Any) -> None:
    """Every entry of a `log_history` must be a dict with an integer `step` (as `Trainer.log` writes them)."""
    if not isinstance(log_history, Sequence) or isinstance(log_history, str):
        raise ValueError(f"`log_history` must be a list of dicts; got {type(log_history).__name__}.")
    for i, entry in enumerate(log_history):
        if not isinstance(entry, Mapping):
            raise ValueError(f"`log_history` entry {i} must be a dict; got {entry!r}.")
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"`log_history` entry {i} must have an integer `step`; got {step!r}.")


def _series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """`(steps, values)` of `key` in the Trainer's `log_history`, one value per step (the last logged)."""
    points = {entry["step"]: entry[key] for entry in log_history if key in entry}
    for step, value in points.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"`{key}` at step {step} of the `log_history` must be a number; got {value!r}.")
    steps = sorted(points)
    return steps, [points[step] for step in steps]


def eval_metrics(log_history: Sequence[Mapping[str, Any]], speed: bool = False) -> list[str]:
    """The `eval_*` keys of `log_history` that measure the model (not `eval_runtime` and the like), or with
    `speed` all of them."""
    keys = (key for entry in log_history for key in entry)
    return list(dict.fromkeys(k for k in keys if k.startswith("eval_")
                              and (speed or not k.endswith(SPEED_SUFFIXES))))


def _resolve_metrics(log_history: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return eval_metrics(log_history)
    logged = eval_metrics(log_history, speed=True)  # a speed metric named explicitly is plotted too
    resolved = [m if m in logged or m.startswith("eval_") else f"eval_{m}" for m in metrics]
    unknown = [m for m, r in zip(metrics, resolved) if r not in logged]
    if unknown:
        measures = eval_metrics(log_history)
        found = (f"the logged eval metrics are {', '.join(measures)}." if measures else
                 "no evaluation is in the log history (it holds those run during training: eval_strategy='steps' "
                 "or 'epoch').")
        raise ValueError(f"No {', '.join(unknown)} in the logs; {found}")
    return resolved


def _plot_sparsity(ax: Any, log_history: Sequence[Mapping[str, Any]]) -> None:
    classes = [key for key in dict.fromkeys(k for entry in log_history for k in entry) if key.startswith("sparsity/")]
    many = len(classes) > MAX_LEGEND_CLASSES
    labels = ([f"each of the {len(classes)} weight classes"] + [None] * (len(classes) - 1) if many
              else short_labels([key.removeprefix("sparsity/") for key in classes]))
    for key, label in zip(classes, labels):
        ax.plot(*_series(log_history, key), linewidth=0.9, alpha=0.75, color="0.6" if many else None, label=label)
    ax.plot(*_series(log_history, "sparsity"), color="black", linewidth=2.2, label="overall")
    ax.set_ylabel("sparsity")
    ax.set_ylim(bottom=0.0)
    _percent_axis(ax.yaxis)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(classes) > 6 else 1)


def _plot_quality(ax: Any, log_history: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> None:
    """Training loss and loss-like metrics on the left axis, the other metrics on a right axis."""
    losses = [key for key in ("loss", *metrics) if key.endswith("loss") and _series(log_history, key)[0]]
    others = [key for key in metrics if key not in losses]
    lines = [ax.plot(*_series(log_history, key), marker="o" if key != "loss" else None, markersize=3,
                     color=f"C{i}", label="train loss" if key == "loss" else key)[0] for i, key in enumerate(losses)]
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if others:
        right = ax.twinx()
        lines += [right.plot(*_series(log_history, key), marker="o", markersize=3, linestyle="--",
                             color=f"C{len(losses) + i}", label=key)[0] for i, key in enumerate(others)]
        right.set_ylabel(", ".join(others) if len(others) == 1 else "eval metric")
    # Above the panel: inside it, the legend would hide the lines of one of the two axes.
    ax.legend(handles=lines, fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=min(4, len(lines)),
              frameon=False)


def plot_training_curves(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                         metrics: Sequence[str] | None = None, title: str | None = None) -> None:
    """Writes a PNG of a pruning run's curves against the optimizer step to `path`.

    The top panel shows the overall sparsity (thick) and each weight class's (thin), as logged by
    `MagnitudePruningCallback`; a bottom panel, when there is something to show, the training loss and the eval
    metrics (losses on the left axis, other metrics on the right one).

    Args:
        log_history (`list[dict]`): `TrainerState.log_history` (the `log_history` of `trainer_state.json`).
        path (`str`): the PNG file to write (atomically).
        metrics (`list[str]`, *optional*): eval metrics to plot (`eval_accuracy` or `accuracy`); default: every
            logged `eval_*` metric.
        title (`str`, *optional*): the figure's title.

    Raises:
        ValueError: when an entry is not a dict with an integer `step`, a plotted value is not a number, no
            sparsity was logged or a requested metric was not.
    """
    _check_log_history(log_history)
    if not _series(log_history, "sparsity")[0]:
        raise ValueError("No `sparsity` in the logs: was the run trained with a MagnitudePruningCallback and did it "
                         "log (logging_steps)?")
    metrics = _resolve_metrics(log_history, metrics)
    show_quality = bool(metrics or _series(log_history, "loss")[0])
    figure = _new_figure(8.0, 7.0 if show_quality else 4.2)
    axes = figure.subplots(2 if show_quality else 1, 1, sharex=True, squeeze=False)[:, 0]
    _plot_sparsity(axes[0], log_history)
    if show_quality:
        _plot_quality(axes[1], log_history, metrics)
    axes[-1].set_xlabel("optimizer step")
    if title:
        figure.suptitle(title)
    _save_png(figure, path)

"""Accuracy against sparsity on SST-2: all-MiniLM-L6-v2 pruned while it fine-tunes, and Zhu & Gupta's
large-sparse vs small-dense comparison.

Every run fine-tunes the pretrained model from scratch with the same settings (`--max_steps` optimizer steps on a
`--max_train_samples`-row subsample of SST-2 train, evaluated on the whole dev set), once dense and then with
`MagnitudePruningCallback` (class-blind magnitude) to each `--sparsities` value under two schedules:
- iterative (Cheong & Daniel 2019): X = Y/2 at step 0, then (Y - X)/9 more every `end/9` steps, Y at 70% of the run;
- cubic (Zhu & Gupta 2017): 0 at step 0 to Y at 70% of the run, an event every `max_steps/25` steps.
Zhu & Gupta: a small dense model (the first k of MiniLM's 6 layers, `--small_dense_layers`) against the large model
pruned (cubic) to the same number of non-zero encoder Linear weights, sparsity 1 - k/6 (every layer has the same
Linear shapes, so the counts match exactly).

    python examples/benchmarks/glue_sparsity.py --output glue_sparsity.md --plot glue_sparsity.png
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from common import (
    accuracy,
    add_common_arguments,
    default_model_path,
    encoder_sparsity,
    fine_tune,
    load_model,
    load_sst2,
    print_and_write,
)
from transformers import AutoTokenizer, DataCollatorWithPadding

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningConfig
from hf_prune.criteria import CRITERIA
from hf_prune.masks import SCHEMES


LAYERS = 6  # all-MiniLM-L6-v2
DEFAULT_VARIANT = ("class-blind", "magnitude")  # (scheme, criterion) of the plotted runs


def pruning_config(schedule: str, sparsity: float, max_steps: int, scheme: str = "class-blind",
                   criterion: str = "magnitude") -> PruningConfig:
    end = int(0.7 * max_steps)
    if schedule == "iterative":
        return PruningConfig(initial_sparsity=sparsity / 2, final_sparsity=sparsity, schedule="iterative",
                             start_step=0, end_step=end, pruning_frequency=max(1, end // 9), scheme=scheme,
                             criterion=criterion, fisher_steps=max(1, end // 9))
    frequency = max(1, max_steps // 25)  # OBD's Fisher: the gradients of the steps since the previous event
    return PruningConfig(final_sparsity=sparsity, schedule="cubic", start_step=0, end_step=end,
                         pruning_frequency=frequency, scheme=scheme, criterion=criterion, fisher_steps=frequency)


def plot(results: list[dict], dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for schedule, marker in (("iterative", "s"), ("cubic", "o")):
        rows = sorted((r for r in results if r["kind"] == schedule), key=lambda r: r["sparsity"])
        left.plot([100 * r["sparsity"] for r in rows], [100 * r["accuracy"] for r in rows], marker=marker,
                  label=f"{schedule} schedule")
    left.axhline(100 * dense, color="grey", linestyle="--", label="dense")
    left.set(xlabel="encoder Linear sparsity (%)", ylabel="SST-2 dev accuracy (%)", title="Accuracy vs sparsity")
    left.legend()
    small = sorted((r for r in results if r["kind"] == "small-dense"), key=lambda r: r["nonzero"])
    sparse = sorted((r for r in results if r["kind"] == "cubic"), key=lambda r: r["nonzero"])
    right.plot([r["nonzero"] / 1e6 for r in sparse], [100 * r["accuracy"] for r in sparse], marker="o",
               label="large-sparse (6 layers, pruned)")
    right.plot([r["nonzero"] / 1e6 for r in small], [100 * r["accuracy"] for r in small], marker="^",
               label="small-dense (fewer layers)")
    right.set(xlabel="non-zero encoder Linear weights (millions)", ylabel="SST-2 dev accuracy (%)",
              title="Zhu & Gupta: large-sparse vs small-dense")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--schedules", nargs="+", choices=["iterative", "cubic"], default=["iterative", "cubic"])
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=["class-blind"])
    parser.add_argument("--criteria", nargs="+", choices=sorted(CRITERIA), default=["magnitude"])
    parser.add_argument("--small_dense_layers", type=int, nargs="*", default=[1, 2], choices=range(1, LAYERS),
                        metavar=f"1..{LAYERS - 1}", help="First k blocks of the model, as small dense baselines.")
    parser.add_argument("--plot", type=Path, default=None, help="Write the accuracy plots to this PNG.")
    parser.add_argument("--skip_dense", action="store_true",
                        help="Do not fine-tune the dense model (no `vs dense` column values, no plot).")
    parser.add_argument("--save_dir", type=Path, default=None,
                        help="Save every pruned model here with PrunedModel.save_pretrained (with its masks).")
    args = parser.parse_args()
    matched = [round(1 - k / LAYERS, 4) for k in args.small_dense_layers]  # the cubic runs of the small models' size
    for kind, sparsity, scheme, criterion in itertools.product(args.schedules, args.sparsities + matched, args.schemes,
                                                                args.criteria):
        try:  # every config is checked before the first (long) fine-tuning
            pruning_config(kind, sparsity, args.max_steps, scheme, criterion)
        except ValueError as error:
            parser.error(str(error))
    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    collator = DataCollatorWithPadding(tokenizer)
    train, dev = load_sst2(args, tokenizer)
    variants = list(itertools.product(args.schemes, args.criteria))
    runs = [] if args.skip_dense else [("dense", 0.0, None, None)]
    if "iterative" in args.schedules:
        runs += [("iterative", s, None, v) for v in variants for s in args.sparsities]
    if "cubic" in args.schedules:
        runs += [("cubic", s, None, v) for v in variants for s in sorted(set(args.sparsities) | set(matched))]
    runs += [("small-dense", 0.0, k, None) for k in args.small_dense_layers]

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, sparsity, layers, variant in runs:
            start = time.perf_counter()
            overrides = {} if layers is None else {"num_hidden_layers": layers}
            model = load_model(model_path, args.seed, **overrides)
            callbacks = None
            if kind in ("iterative", "cubic"):
                callbacks = [MagnitudePruningCallback(pruning_config(kind, sparsity, args.max_steps, *variant))]
            trainer = fine_tune(args, model, train, collator, tmp, callbacks)
            if args.save_dir and callbacks:
                folder = args.save_dir / f"{kind}-{'-'.join(variant)}-{round(100 * sparsity)}"
                PrunedModel.from_trainer(trainer).save_pretrained(folder, processing_class=tokenizer)
            achieved = encoder_sparsity(trainer.model)
            linear = sum(p.numel() for n, p in trainer.model.named_parameters()
                         if ".encoder.layer." in n and n.endswith(".weight") and p.dim() == 2)
            results.append({"kind": kind, "variant": variant, "sparsity": achieved, "layers": layers or LAYERS,
                            "nonzero": round(linear * (1 - achieved)),
                            "accuracy": accuracy(trainer.model, dev, collator),
                            "seconds": time.perf_counter() - start})
            print(f"{kind} {sparsity:.3f} layers={layers or LAYERS}: {results[-1]}", flush=True)

    dense = results[0]["accuracy"] if not args.skip_dense else None
    lines = [f"SST-2: {len(train)} training rows (random subsample, seed 0), {len(dev)} dev rows; "
             f"{args.max_steps} steps x batch {args.batch_size}, lr {args.learning_rate}, max length "
             f"{args.max_seq_length}; all-MiniLM-L6-v2, pruning of the encoder's Linear weights (embeddings "
             "excluded)", "",
             "| model | schedule, scheme, criterion | encoder sparsity | non-zero encoder Linear weights | dev accuracy | vs dense | time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        model = "MiniLM-L6" if r["layers"] == LAYERS else f"MiniLM, first {r['layers']} layer(s)"
        gap = "-" if dense is None else f"{100 * (r['accuracy'] - dense):+.2f} pt"
        schedule = ", ".join([r["kind"], *r["variant"]]) if r["variant"] else {"dense": "-"}.get(r["kind"], "- (small dense)")
        lines.append(f"| {model} | {schedule} | {r['sparsity']:.2%} | {r['nonzero'] / 1e6:.2f}M | "
                     f"{r['accuracy']:.2%} | {gap} | {r['seconds']:.0f} s |")
    print_and_write("\n".join(lines), args.output)
    if args.plot and dense is not None:
        plot([r for r in results if r["variant"] in (None, DEFAULT_VARIANT)], dense, args.plot)


if __name__ == "__main__":
    main()

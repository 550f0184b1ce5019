"""Structured pruning on SST-2: fine-tune all-MiniLM-L6-v2 while whole feed-forward neurons are pruned
(`PruningConfig(structure="neurons", scheme="class-uniform")`), shrink the result to a smaller standard BERT
(`PrunedModel.shrink`), and compare its dev accuracy with the dense model's and with small-dense baselines (the
first k layers of the pretrained model, fine-tuned alike).

Every shrunk model is checked against its masked model (same dev predictions) and, with `--save_dir`, saved with
its own `save_pretrained` beside the dense one, for `inference_speed.py` to time:

    python examples/benchmarks/structured_sparsity.py --max_train_samples 67349 --max_steps 1500 \\
        --sparsities 0.75 --criteria obd --distill --save_dir out/structured --output structured.md

`--distill` fine-tunes the dense model first and distils every pruned run from it (`DistillationTrainer`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    accuracy,
    add_common_arguments,
    default_model_path,
    fine_tune,
    fraction,
    load_model,
    print_and_write,
    setup_sst2,
)
from transformers import AutoModelForSequenceClassification  # noqa: E402

from hf_prune import (  # noqa: E402
    DistillationTrainer,
    MagnitudePruningCallback,
    PrunedModel,
    PruningConfig,
    block_influence,
    drop_layers,
)
from hf_prune.criteria import CRITERIA  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, max_train_samples=8000, max_steps=300)
    parser.add_argument("--sparsities", type=fraction, nargs="*", default=[0.5, 0.75],
                        help="Fractions of the feed-forward neurons removed (in every layer).")
    parser.add_argument("--criteria", nargs="+", choices=sorted(CRITERIA), default=["magnitude"])
    parser.add_argument("--fisher_steps", type=int, default=60, help="Steps of statistics before each event.")
    parser.add_argument("--pruning_frequency", type=int, default=None)
    parser.add_argument("--end_fraction", type=float, default=0.75,
                        help="The schedule ends at this fraction of --max_steps; the rest recovers.")
    parser.add_argument("--layers", type=int, default=None,
                        help="Pruned runs start from the first k layers of the pretrained model (whole blocks "
                             "removed before fine-tuning, then neurons pruned); default: all.")
    parser.add_argument("--drop_blocks", type=int, default=None,
                        help="Pruned runs start without the k blocks of lowest block influence on 16 training "
                             "batches (hf_prune.block_influence, removed with drop_layers before fine-tuning).")
    parser.add_argument("--small_dense_layers", type=int, nargs="*", default=[],
                        help="Also fine-tune the first k layers of the pretrained model, for each k.")
    parser.add_argument("--distill", action="store_true", help="Distil every pruned run from the dense model.")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="With --distill: a dense folder saved by an earlier run's --save_dir, used as the "
                             "dense model (teacher and reference row) instead of fine-tuning it again.")
    parser.add_argument("--distill_alpha", type=float, default=0.9)
    parser.add_argument("--distill_temperature", type=float, default=2.0)
    parser.add_argument("--skip_dense", action="store_true",
                        help="Do not fine-tune the dense model (its row is left out; not with --distill).")
    parser.add_argument("--save_dir", type=Path, default=None, help="Save the dense and shrunk models here.")
    args = parser.parse_args()
    if args.skip_dense and args.distill:
        parser.error("--distill needs the dense model as its teacher; drop --skip_dense.")
    if args.layers is not None and args.drop_blocks is not None:
        parser.error("--layers keeps the first k blocks, --drop_blocks removes the least useful k: pick one.")
    if args.teacher is not None and not args.distill:
        parser.error("--teacher is the dense model for --distill; add --distill.")
    for criterion, sparsity in itertools.product(args.criteria, args.sparsities):
        try:  # every config is checked before the first (long) fine-tuning
            pruning_config(args, criterion, sparsity)
        except ValueError as error:
            parser.error(str(error))
    return args


def pruning_config(args: argparse.Namespace, criterion: str, sparsity: float) -> PruningConfig:
    """The config of one pruned run: neurons, class-uniform, cubic from `fisher_steps` to `end_fraction` of the
    steps."""
    return PruningConfig(structure="neurons", scheme="class-uniform", schedule="cubic", final_sparsity=sparsity,
                         start_step=args.fisher_steps, end_step=int(args.end_fraction * args.max_steps),
                         pruning_frequency=args.pruning_frequency, criterion=criterion,
                         fisher_steps=args.fisher_steps)


def without_least_influential_blocks(model, count: int, train_set: list[dict], collator):
    """`model` without its `count` blocks of lowest block influence on the first 16 training batches, and their
    indices."""
    batches = [collator(train_set[i:i + 32]) for i in range(0, min(len(train_set), 16 * 32), 32)]
    scores = block_influence(model, batches)["bert.encoder.layer"]
    dropped = sorted(sorted(range(len(scores)), key=scores.__getitem__)[:count])
    print(f"block influence: {[round(s, 4) for s in scores]}; dropping blocks {dropped}", flush=True)
    return drop_layers(model, dropped), dropped


def main() -> None:
    args = parse_args()
    model_path = args.model or default_model_path()
    tokenizer, collator, train_set, dev_set = setup_sst2(args)
    rows, teacher, dense_accuracy = [], None, None
    with tempfile.TemporaryDirectory() as scratch:
        dense, dense_name = None, "dense"
        if args.teacher is not None:
            dense = AutoModelForSequenceClassification.from_pretrained(args.teacher)
            dense_name = f"dense ({args.teacher.name}, loaded)"
        elif not args.skip_dense:
            dense = fine_tune(args, load_model(model_path, args.seed), train_set, collator, scratch).model
            if args.save_dir:
                dense.save_pretrained(args.save_dir / "dense")
                tokenizer.save_pretrained(args.save_dir / "dense")
        if dense is not None:
            dense_accuracy = accuracy(dense, dev_set, collator)
            rows.append((dense_name, "-", dense_accuracy, sum(p.numel() for p in dense.parameters()), "-"))
        teacher = dense if args.distill else None
        end_step = int(args.end_fraction * args.max_steps)
        for criterion in args.criteria:
            for sparsity in args.sparsities:
                config = pruning_config(args, criterion, sparsity)
                distillation = {} if teacher is None else {
                    "trainer_class": DistillationTrainer, "teacher_model": teacher, "alpha": args.distill_alpha,
                    "temperature": args.distill_temperature}
                layers = {} if args.layers is None else {"num_hidden_layers": args.layers}
                model = load_model(model_path, args.seed, **layers)
                if args.drop_blocks is not None:
                    model, dropped = without_least_influential_blocks(model, args.drop_blocks, train_set, collator)
                trainer = fine_tune(args, model, train_set, collator, scratch, [MagnitudePruningCallback(config)],
                                    **distillation)
                pruned = PrunedModel.from_trainer(trainer)
                masked_accuracy = accuracy(pruned.model, dev_set, collator)
                small = pruned.shrink()
                small_accuracy = accuracy(small, dev_set, collator)
                if small_accuracy != masked_accuracy:
                    raise RuntimeError(f"shrunk model accuracy {small_accuracy} != masked {masked_accuracy}")
                blocks = "" if args.layers is None else f"layers-{args.layers}-"
                blocks += "" if args.drop_blocks is None else f"without-{'-'.join(map(str, dropped))}-"
                name = (f"{blocks}neurons-{round(100 * sparsity)}-"
                        f"{criterion}{'-kd' if teacher is not None else ''}"
                        f"{'' if args.end_fraction == 0.75 else f'-end-{end_step}'}")
                rows.append((name, f"{small.config.intermediate_size}", small_accuracy,
                             sum(p.numel() for p in small.parameters()), f"{pruned.sparsity_report().overall:.4f}"))
                if args.save_dir:
                    small.save_pretrained(args.save_dir / name)
                    tokenizer.save_pretrained(args.save_dir / name)
        for layers in args.small_dense_layers:
            small = fine_tune(args, load_model(model_path, args.seed, num_hidden_layers=layers), train_set,
                              collator, scratch).model
            rows.append((f"first {layers} layers", f"{small.config.intermediate_size}", accuracy(small, dev_set, collator),
                         sum(p.numel() for p in small.parameters()), "-"))
            if args.save_dir:
                small.save_pretrained(args.save_dir / f"dense-{layers}-layers")
                tokenizer.save_pretrained(args.save_dir / f"dense-{layers}-layers")
    kd = f", distilled from the dense run (α {args.distill_alpha}, T {args.distill_temperature})" if args.distill else ""
    lines = [f"SST-2 dev accuracy, all-MiniLM-L6-v2, {len(train_set)} training examples, {args.max_steps} steps, "
             f"batch {args.batch_size}, seq {args.max_seq_length}, seed {args.seed}; pruned runs: whole feed-forward "
             f"neurons, class-uniform, cubic to step {end_step}{kd}.", "",
             "| model | FFN width | dev accuracy | vs dense | parameters | zeros among FFN weights before shrink |",
             "|---|---|---|---|---|---|"]
    for name, width, acc, params, zeros in rows:
        gap = "-" if dense_accuracy is None else f"{100 * (acc - dense_accuracy):+.2f} pt"
        lines.append(f"| {name} | {width} | {100 * acc:.2f}% | {gap} | "
                     f"{params / 1e6:.2f}M | {zeros} |")
    print_and_write("\n".join(lines), args.output)


if __name__ == "__main__":
    main()

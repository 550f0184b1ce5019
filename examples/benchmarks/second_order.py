"""One-shot pruning without retraining on SST-2: magnitude vs second-order OBD and OBS (SparseGPT) on all-MiniLM-L6-v2.

all-MiniLM-L6-v2 is fine-tuned dense on `--max_train_samples` rows of SST-2's train.tsv (a random subsample, seed 0,
as in the other SST-2 benchmarks), then pruned one-shot, with no retraining, to each of `--sparsities` (unstructured)
and `--patterns` (N:M, e.g. 2:4, N of every M consecutive input weights kept), and each pruned copy is scored on
dev.tsv beside the dense model:

- magnitude (global): the library default, `Pruner` with the class-blind scheme (one |w| threshold for all layers);
  not defined for N:M.
- magnitude (per layer): the lowest |w| of every layer (class-uniform over single tensors), or the N largest |w| of
  every group of M: the same sparsity in every layer as OBS, so only the choice of weights differs.
- OBS: `hf_prune.obs_prune` (SparseGPT's solver, per-layer input Hessians from `--calibration_samples` training
  rows, OBS update of the kept weights).
- OBD: `Pruner` with `criterion="obd"` (saliency ½·F_ii·w_i², Optimal Brain Damage with the empirical Fisher
  diagonal), F estimated by `Pruner.estimate_fisher` from the gradients of the same calibration rows, one row per
  gradient (the per-example empirical Fisher); ranked class-blind like magnitude (global), since saliencies are loss
  increases comparable across layers; for N:M, the N highest saliencies of every group of M.

Sparsity is over the encoder's Linear weights (hf_prune's default targets). Each pruning runs in a fresh Python
process that loads the fine-tuned model, so its cost is measured alone: wall time of the pruning call (calibration
passes included), and the peak RSS growth during it, i.e. `VmHWM` after the call minus `VmRSS` before it, with the
high-water mark reset beforehand by writing 5 to `/proc/self/clear_refs` (Linux). That is all memory the process
touched for pruning (temporaries, Hessians, allocator caches), not just tensors.

    OMP_NUM_THREADS=1 python examples/benchmarks/second_order.py --max_train_samples 16000 --max_steps 500 \\
        --output second_order.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch
from common import (
    accuracy,
    add_common_arguments,
    encoder_sparsity,
    fine_tune,
    fraction,
    load_model,
    positive_int,
    print_and_write,
    proc_status_bytes,
    reset_peak_rss,
    setup_sst2,
)
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from hf_prune import Pruner, PruningConfig
from hf_prune.methods.obs import nm_mask, obs_prune, parse_pattern


METHODS = ("magnitude (global)", "magnitude (per layer)", "OBD", "OBS")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, max_train_samples=16000, max_steps=500)
    parser.add_argument("--sparsities", type=fraction, nargs="*", default=[0.5, 0.6, 0.7])
    parser.add_argument("--patterns", nargs="*", default=["2:4"], help="N:M patterns, e.g. 2:4.")
    parser.add_argument("--calibration_samples", type=positive_int, default=128, help="Training rows OBS calibrates on.")
    parser.add_argument("--calibration_batch_size", type=positive_int, default=16)
    parser.add_argument("--block_size", type=positive_int, default=128, help="OBS columns per lazy-update block.")
    parser.add_argument("--dampening", type=float, default=0.01, help="OBS dampening, relative to mean(diag H).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


# ------------------------------------------------------------------------------------- one pruning per process
def prune(model: torch.nn.Module, method: str, level: str, calibration: DataLoader, args: argparse.Namespace) -> None:
    """Prunes `model` in place with `method` to `level` (a sparsity such as "0.5" or a pattern such as "2:4")."""
    nm = parse_pattern(level) if ":" in level else None
    sparsity = None if nm else float(level)
    if method == "OBS":
        obs_prune(model, calibration, sparsity, level if nm else None, block_size=args.block_size,
                  dampening=args.dampening, show_progress=False)
        return
    per_layer = method == "magnitude (per layer)"
    config = PruningConfig(schedule="oneshot", final_sparsity=sparsity or (nm[1] - nm[0]) / nm[1],
                           scheme="class-uniform" if per_layer else "class-blind",
                           class_granularity="tensor" if per_layer else "role",
                           criterion="obd" if method == "OBD" else "magnitude")
    pruner = Pruner(model, config)
    if method == "OBD":
        pruner.estimate_fisher(model, DataLoader(calibration.dataset, batch_size=1, collate_fn=calibration.collate_fn))
    if nm:
        pruner.load_masks({name: nm_mask(pruner.criterion.score(name, param), *nm)
                           for name, param in pruner.params.items()})
    else:
        pruner.prune_to(sparsity)


def run_worker(args: argparse.Namespace) -> None:
    """Loads the fine-tuned model, prunes it once, measures, evaluates; prints one JSON line."""
    spec = json.loads(args.worker)
    with open(os.path.join(spec["workdir"], "data.json"), encoding="utf-8") as f:
        data = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    collator = DataCollatorWithPadding(tokenizer)
    model = load_model(spec["model_dir"], args.seed)
    calibration = DataLoader(data["calibration"], batch_size=args.calibration_batch_size, collate_fn=collator)
    result = {"method": spec["method"], "level": spec["level"], "seconds": None, "peak_mib": None}
    if spec["method"] != "dense":
        try:
            reset_peak_rss()
            measured = True
        except OSError:  # not Linux >= 4.0: time only
            measured = False
        before = proc_status_bytes("VmRSS") if measured else 0
        start = time.perf_counter()
        prune(model, spec["method"], spec["level"], calibration, args)
        result["seconds"] = time.perf_counter() - start
        if measured:
            result["peak_mib"] = (proc_status_bytes("VmHWM") - before) / 2**20
    result["sparsity"] = encoder_sparsity(model)
    result["accuracy"] = accuracy(model, data["dev"], collator, 2 * args.batch_size)
    print(json.dumps(result))


def run_in_subprocess(spec: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", json.dumps(spec)]
    completed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ driver
def runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    levels = [f"{s:g}" for s in args.sparsities] + list(args.patterns)
    for pattern in args.patterns:
        parse_pattern(pattern)
    return [("dense", "")] + [(method, level) for level in levels for method in METHODS
                              if not (":" in level and method == "magnitude (global)")]


def table(results: list[dict]) -> str:
    dense = results[0]["accuracy"]
    lines = ["| method | target | encoder sparsity | SST-2 dev accuracy | Δ vs dense | wall time | peak RSS growth |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        seconds = "–" if r["seconds"] is None else f"{r['seconds']:.2f} s"
        memory = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        lines.append(f"| {r['method']} | {r['level'] or 'dense'} | {r['sparsity']:.2%} | {r['accuracy']:.2%} | "
                     f"{100 * (r['accuracy'] - dense):+.2f} pt | {seconds} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    if args.worker is not None:
        run_worker(args)
        return
    plan = runs(args)
    tokenizer, collator, train_set, dev_set = setup_sst2(args)
    # Calibration rows sorted by length, so each batch is padded little (obs_prune counts every position).
    calibration = sorted(random.Random(args.seed + 1).sample(train_set, min(args.calibration_samples, len(train_set))),
                         key=lambda row: len(row["input_ids"]))
    print(f"SST-2: {len(train_set)} training rows (random subsample, seed 0), {len(dev_set)} dev rows, "
          f"{len(calibration)} calibration rows; {args.max_steps} steps x batch {args.batch_size}, seq len "
          f"{args.max_seq_length}, lr {args.learning_rate}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = os.path.join(workdir, "dense")
        dense = load_model(args.model, args.seed)
        fine_tune(args, dense, train_set, collator, os.path.join(workdir, "trainer"))
        dense.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        with open(os.path.join(workdir, "data.json"), "w", encoding="utf-8") as f:
            json.dump({"calibration": calibration, "dev": dev_set}, f)
        fine_tune_seconds = time.perf_counter() - start
        results = []
        for method, level in plan:
            results.append(run_in_subprocess({"method": method, "level": level, "workdir": workdir,
                                              "model_dir": model_dir}))
            print(f"{method} {level}: dev accuracy {results[-1]['accuracy']:.4f}", flush=True)

    header = (f"all-MiniLM-L6-v2 fine-tuned on {len(train_set)} SST-2 training rows ({args.max_steps} steps, batch "
              f"{args.batch_size}, seq len {args.max_seq_length}, lr {args.learning_rate}, seed {args.seed}; "
              f"{fine_tune_seconds:.0f} s), then pruned one-shot without retraining; {len(dev_set)} dev rows. OBS "
              f"calibrates on {len(calibration)} training rows, OBD takes its Fisher diagonal from their per-row "
              f"gradients (OBS block {args.block_size}, dampening "
              f"{args.dampening}). Wall time and peak RSS growth are of the pruning call alone, each in a fresh "
              f"process, with {torch.get_num_threads()} thread(s); {time.perf_counter() - start:.0f} s in all.\n\n")
    print_and_write(header + table(results), args.output)


if __name__ == "__main__":
    main()

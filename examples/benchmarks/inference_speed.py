"""Inference speed in plain transformers: dense, unstructured (dense and sparse kernels), shrunk structured and
small-dense models of all-MiniLM-L6-v2 on SST-2, each as a ratio to the dense model measured in the same run.

For every model: dev accuracy, non-zero and total parameters, folder size, peak resident memory, latency at batch
1 x 128 tokens and throughput at batch 32 x 64 tokens, with 1 and 2 threads. Each measurement runs in a fresh
process (so peak memory is the model's own), one after the other:

    python examples/benchmarks/inference_speed.py --dense out/structured/dense \\
        --models ffn307=out/structured/neurons-80-obd "first 3 layers=out/structured/dense-3-layers" \\
        --pruned "unstructured 90%=out/unstructured/cubic-class-blind-obd-90" \\
        --unstructured 0.8 0.9 0.95 --output inference_speed.md --plot inference_speed.png

`--dense` is a fine-tuned classifier folder (its accuracy is the reference); `--models` are plain transformers
folders (a `PrunedModel.shrink()` result, a small dense model); `--pruned` are `PrunedModel` folders fine-tuned
with their masks (`glue_sparsity.py --save_dir`), each measured with the dense kernel and after
`PrunedModel.to_sparse_inference()`; `--unstructured S` prunes the dense model one-shot to S by magnitude and
measures it with both kernels too (not fine-tuned: its speed is what the kernels give at S, its accuracy what
one-shot pruning costs; these rows are left out of the plot). With a CUDA GPU, a latency column on the GPU is
added.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SHARED_SST2,
    encode,
    existing_folder,
    fraction,
    named_folder,
    positive_int,
    print_and_write,
    proc_status_bytes,
    read_tsv,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, type=existing_folder, help="Folder of the fine-tuned dense classifier.")
    parser.add_argument("--models", type=named_folder, nargs="*", default=[], metavar="NAME=FOLDER",
                        help="Other plain transformers folders (shrunk or small dense models).")
    parser.add_argument("--pruned", type=named_folder, nargs="*", default=[], metavar="NAME=FOLDER",
                        help="PrunedModel folders (fine-tuned with masks), each with the dense and the sparse kernel.")
    parser.add_argument("--unstructured", type=fraction, nargs="*", default=[0.8, 0.9, 0.95],
                        help="Sparsities of one-shot magnitude pruning of the dense model.")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--data_dir", default=str(SHARED_SST2), help="Folder with dev.tsv.")
    parser.add_argument("--latency_repeats", type=positive_int, default=30)
    parser.add_argument("--throughput_repeats", type=positive_int, default=8)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of accuracy against 1-thread latency.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


# --------------------------------------------------------------------------------------------- one measurement
def _load(spec: dict):
    """The model of one measurement (a plain folder, a `PrunedModel` folder, or the dense folder pruned one-shot;
    the last two with the dense or the sparse kernel), the `to_sparse_inference` report (or None), and its total
    and non-zero parameter counts."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_prune import PrunedModel, Pruner, PruningConfig

    if spec.get("masks"):
        pruned = PrunedModel.from_pretrained(spec["folder"]).eval()
        model = pruned.model
    else:
        model = AutoModelForSequenceClassification.from_pretrained(spec["folder"]).eval()
        if spec.get("sparsity") is None:
            return model, None, _counts(model)
        pruner = Pruner(model, PruningConfig(schedule="oneshot", final_sparsity=spec["sparsity"]))
        pruner.prune_to(spec["sparsity"])
        pruned = PrunedModel(model, pruner.masks, pruner.config)
    counts, report = _counts(model), None
    if spec["kernel"] == "sparse":
        with torch.no_grad():
            report = pruned.to_sparse_inference(num_tokens=32 * 64)
    return pruned, report, counts


def _counts(model) -> dict[str, int]:
    return {"total_params": sum(p.numel() for p in model.parameters()),
            "nonzero_params": sum(int((p != 0).sum()) for p in model.parameters())}


def _time(model, batch: dict, repeats: int, device: str = "cpu") -> float:
    """Median seconds of one forward pass on `batch` over `repeats` runs, after 3 warm-up runs."""
    import torch

    with torch.inference_mode():
        for _ in range(3):
            model(**batch)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**batch)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return median(times)


def _accuracy(model, tokenizer_folder: str, data_dir: str) -> float:
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    dev = encode(tokenizer, read_tsv(Path(data_dir) / "dev.tsv"), 64)
    correct = 0
    with torch.inference_mode():
        for batch in DataLoader(dev, batch_size=128, collate_fn=DataCollatorWithPadding(tokenizer)):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(dev)


def worker(spec: dict) -> dict:
    """Runs one measurement (in its own process) and returns its figures."""
    import torch

    torch.set_num_threads(spec["threads"])
    model, report, counts = _load(spec)
    vocab = 1000
    generator = torch.Generator().manual_seed(0)
    latency_batch = {"input_ids": torch.randint(vocab, (1, 128), generator=generator)}
    throughput_batch = {"input_ids": torch.randint(vocab, (32, 64), generator=generator)}
    for batch in (latency_batch, throughput_batch):
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    result = {"latency": _time(model, latency_batch, spec["latency_repeats"]),
              "throughput": 32 * 64 / _time(model, throughput_batch, spec["throughput_repeats"])}
    if spec["accuracy"]:
        result["accuracy"] = _accuracy(model, spec["tokenizer"], spec["data_dir"])
    result.update(counts)
    result["sparse_layers"] = None if report is None else f"{len(report.converted)} of {len(report.choices)}"
    result["peak_rss"] = proc_status_bytes("VmHWM")
    if torch.cuda.is_available() and spec.get("kernel") != "sparse":
        model.to("cuda")
        gpu_batch = {k: v.to("cuda") for k, v in latency_batch.items()}
        result["gpu_latency"] = _time(model, gpu_batch, spec["latency_repeats"], "cuda")
    return result


# ------------------------------------------------------------------------------------------------- the run
def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def measure(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run([sys.executable, __file__, "--dense", spec["folder"], "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"measurement {spec['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    common = {"latency_repeats": args.latency_repeats, "throughput_repeats": args.throughput_repeats,
              "data_dir": args.data_dir, "tokenizer": args.dense}
    entries = [("dense", {"folder": args.dense}, folder_bytes(args.dense))]
    for name, folder in args.models:
        entries.append((name, {"folder": folder, "tokenizer": folder}, folder_bytes(folder)))
    for name, folder in args.pruned:
        for kernel in ("dense", "sparse"):
            entries.append((f"{name} ({kernel} kernel)", {"folder": folder, "tokenizer": folder, "masks": True,
                                                          "kernel": kernel}, folder_bytes(folder)))
    with tempfile.TemporaryDirectory() as scratch:
        for sparsity in args.unstructured:
            size = _saved_size(args.dense, sparsity, Path(scratch) / f"u{sparsity}")
            for kernel in ("dense", "sparse"):
                entries.append((f"one-shot {round(100 * sparsity)}%, not fine-tuned ({kernel} kernel)",
                                {"folder": args.dense, "sparsity": sparsity, "kernel": kernel}, size))
    rows = []
    for name, spec, size in entries:
        row = {"name": name, "size": size}
        for threads in args.threads:
            figures = measure({**common, **spec, "name": name, "threads": threads,
                               "accuracy": threads == args.threads[0]})
            row.update({f"{key}@{threads}": value for key, value in figures.items()
                        if key in ("latency", "throughput", "peak_rss", "gpu_latency", "sparse_layers")})
            row.update({key: value for key, value in figures.items()
                        if key in ("accuracy", "total_params", "nonzero_params")})
        rows.append(row)
        print(f"measured {name}", file=sys.stderr)
    print_and_write(_table(rows, args), args.output)
    if args.plot:
        _plot(rows, args.threads[0], args.plot)


def _saved_size(dense: str, sparsity: float, folder: Path) -> int:
    """Bytes of the one-shot pruned model saved with `compression="sparse"` and the dense folder's tokenizer (every
    file of the folder, as for the other rows)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_prune import PrunedModel, Pruner, PruningConfig

    model = AutoModelForSequenceClassification.from_pretrained(dense)
    pruner = Pruner(model, PruningConfig(schedule="oneshot", final_sparsity=sparsity))
    pruner.prune_to(sparsity)
    PrunedModel(model, pruner.masks, pruner.config).save_pretrained(
        folder, compression="sparse", processing_class=AutoTokenizer.from_pretrained(dense))
    return folder_bytes(folder)


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = rows[0]
    gpu = any(f"gpu_latency@{t}" in dense for t in args.threads)
    header = ["model", "dev accuracy", "non-zero / total params", "folder", "peak RSS"]
    for t in args.threads:
        header += [f"latency 1x128, {t} thr", f"throughput 32x64, {t} thr"]
    if gpu:
        header.append("GPU latency 1x128")
    lines = ["Ratios to the dense model measured in the same run (latency: dense / model, so > 1 is faster; "
             "throughput: model / dense). Dense absolute figures in the first row.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"], f"{100 * row['accuracy']:.2f}%",
                 f"{row['nonzero_params'] / 1e6:.2f}M / {row['total_params'] / 1e6:.2f}M",
                 f"{row['size'] / 2 ** 20:.1f} MiB" if row is dense else f"{row['size'] / dense['size']:.2f}x",
                 f"{row[f'peak_rss@{args.threads[0]}'] / 2 ** 20:.0f} MiB" if row is dense
                 else f"{row[f'peak_rss@{args.threads[0]}'] / dense[f'peak_rss@{args.threads[0]}']:.2f}x"]
        for t in args.threads:
            if row is dense:
                cells += [f"{1000 * row[f'latency@{t}']:.1f} ms", f"{row[f'throughput@{t}']:.0f} tok/s"]
            else:
                cells += [f"{dense[f'latency@{t}'] / row[f'latency@{t}']:.2f}x",
                          f"{row[f'throughput@{t}'] / dense[f'throughput@{t}']:.2f}x"]
        if gpu:
            key = f"gpu_latency@{args.threads[0]}"
            cells.append("-" if key not in row else f"{1000 * row[key]:.2f} ms" if row is dense
                         else f"{dense[key] / row[key]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    sparse_layers = [f"{row['name']}: " + ", ".join(f"{row[f'sparse_layers@{t}']} ({t} thr)" for t in args.threads)
                     for row in rows if row.get(f"sparse_layers@{args.threads[0]}") is not None]
    if sparse_layers:
        lines += ["", "Layers `to_sparse_inference` converted, of the masked Linear layers: "
                  + "; ".join(sparse_layers) + "."]
    return "\n".join(lines)


def _plot(rows: list[dict], threads: int, path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    dense = rows[0]
    colors = colormaps["tab20"].colors
    markers = "osD^vPX<>*"
    for i, row in enumerate(row for row in rows if not row["name"].startswith("one-shot")):
        ax.scatter(dense[f"latency@{threads}"] / row[f"latency@{threads}"], 100 * row["accuracy"], label=row["name"],
                   marker=markers[i % len(markers)], color=colors[i % len(colors)])
    ax.axhline(100 * dense["accuracy"] - 1.5, color="grey", linestyle=":", linewidth=1, label="dense - 1.5 pt")
    ax.set_xlabel(f"speed-up over dense, latency 1x128, {threads} thread(s)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2: accuracy against CPU latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: labels never overlap
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

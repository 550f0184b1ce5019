"""One class-blind pruning event on a ~2B-parameter Llama: hf_prune's radix select against concatenate-and-sort.

- radix: `Pruner(model, config).prune_to(sparsity)`, the two-pass histogram select of `hf_prune.masks`, which
  holds a few temporaries of the largest single weight besides the model and its masks.
- sort: |w| of every targeted weight concatenated in float32 and `torch.sort(stable=True)`ed; the stable sort
  breaks ties like hf_prune (targets in model order, then row-major), so both give the same masks.

Each method runs in a fresh subprocess, so their peaks do not mix, under an address-space cap (`RLIMIT_AS`), so one
that needs more fails cleanly with an out-of-memory error instead of waking the OOM killer; it is then reported as
"did not fit under the cap". Peak memory is the process's peak RSS (`VmHWM`) during the event, reset right before it
(`/proc/self/clear_refs`), so it includes the model. The weights are random bf16: the model is built without
transformers' initialisation and filled with `normal_` tensor by tensor. bf16 has few distinct magnitudes, so the
threshold has many exact ties.

    OMP_NUM_THREADS=1 python examples/benchmarks/large_model.py               # ~2.0B parameters, 22 layers
    OMP_NUM_THREADS=1 python examples/benchmarks/large_model.py --scale 0.35  # smoke test, ~125M parameters
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.initialization import no_init_weights

from hf_prune import Pruner, PruningConfig
from hf_prune.distributed import masks_fingerprint


LAYERS, HIDDEN, INTERMEDIATE, HEADS, VOCAB = 22, 2048, 11008, 16, 32000
GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="Fraction of the layer count and of the widths (parameters scale about as its cube).")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--cap_gib", type=float, default=20.0, help="Address-space cap of each method's process.")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["radix", "sort"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    return parser.parse_args()


def model_config(scale: float) -> LlamaConfig:
    """The ~2B Llama at `scale` of its layers and widths (widths kept multiples of 64 for the 16 heads)."""
    width = lambda size: max(64, 64 * round(size * scale / 64))  # noqa: E731
    return LlamaConfig(hidden_size=width(HIDDEN), intermediate_size=width(INTERMEDIATE),
                       num_hidden_layers=max(1, round(LAYERS * scale)), num_attention_heads=HEADS,
                       num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=2048)


@torch.no_grad()
def build_model(scale: float, seed: int) -> torch.nn.Module:
    """A randomly initialised bf16 Llama: no transformers init, then `normal_` (norms set to 1) per tensor."""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(model_config(scale), dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model


def prune_radix(pruner: Pruner, sparsity: float) -> None:
    pruner.prune_to(sparsity)


@torch.no_grad()
def prune_sort(pruner: Pruner, sparsity: float) -> None:
    """The naive global threshold: one float32 copy of every targeted |w|, sorted."""
    sizes = [mask.numel() for mask in pruner.masks.values()]
    scores = torch.empty(sum(sizes), dtype=torch.float32)
    for chunk, param in zip(scores.split(sizes), pruner.params.values()):
        chunk.copy_(param.view(-1)).abs_()
    pruned = torch.sort(scores, stable=True).indices[:round(sparsity * scores.numel())]
    kept = torch.ones(scores.numel(), dtype=torch.bool)
    kept[pruned] = False
    for mask, chunk in zip(pruner.masks.values(), kept.split(sizes)):
        mask.copy_(chunk.view_as(mask))
    pruner.apply_()


METHODS = {"radix": prune_radix, "sort": prune_sort}


def memory_status(field: str) -> int:
    """`VmRSS` or `VmHWM` of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def run_worker(args: argparse.Namespace) -> dict[str, object]:
    """Builds the model, then times one pruning event with `args.worker` under the address-space cap."""
    cap = int(args.cap_gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    model = build_model(args.scale, args.seed)
    pruner = Pruner(model, PruningConfig(final_sparsity=args.sparsity, schedule="oneshot", scheme="class-blind"))
    result: dict[str, object] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "targeted": sum(m.numel() for m in pruner.masks.values()),
        "before_gib": memory_status("VmRSS") / GIB,
    }
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    try:
        METHODS[args.worker](pruner, args.sparsity)
    except (MemoryError, torch.OutOfMemoryError) as err:
        result.update(status="did not fit under the cap", error=str(err).splitlines()[0])
    except RuntimeError as err:  # older torch reports CPU allocation failures as a plain RuntimeError
        if "alloc" not in str(err):
            raise
        result.update(status="did not fit under the cap", error=str(err).splitlines()[0])
    else:
        result.update(status="ok", sparsity=pruner.sparsity(), fingerprint=masks_fingerprint(pruner.masks).tolist())
    result.update(seconds=time.perf_counter() - start, peak_gib=memory_status("VmHWM") / GIB)
    return result


def run_method(args: argparse.Namespace, method: str) -> dict[str, object]:
    """`run_worker` for `method` in a fresh Python process; its JSON result, or the reason it gave none."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--scale", str(args.scale),
               "--sparsity", str(args.sparsity), "--cap_gib", str(args.cap_gib), "--seed", str(args.seed)]
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        tail = (process.stderr.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
        return {"status": f"failed: {tail}"}
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return
    config = model_config(args.scale)
    print(f"Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
          f"{config.intermediate_size}, bf16; class-blind to {args.sparsity:.0%}; cap {args.cap_gib:g} GiB; "
          f"torch threads {torch.get_num_threads()}")
    results = {method: run_method(args, method) for method in args.methods}
    first = next(iter(results.values()))
    if "parameters" in first:
        print(f"{first['parameters'] / 1e9:.3f}B parameters, {first['targeted'] / 1e9:.3f}B targeted; "
              f"RSS before the event {first['before_gib']:.2f} GiB")
    print("| method | time (s) | peak RSS (GiB) | above model + masks (GiB) | status |\n|---|---|---|---|---|")
    for method, result in results.items():
        if "seconds" in result:
            print(f"| {method} | {result['seconds']:.2f} | {result['peak_gib']:.2f} | "
                  f"{result['peak_gib'] - result['before_gib']:.2f} | {result['status']} |")
        else:
            print(f"| {method} | | | | {result['status']} |")
    fingerprints = [r["fingerprint"] for r in results.values() if "fingerprint" in r]
    if len(fingerprints) > 1:
        print("Masks identical across methods:", all(f == fingerprints[0] for f in fingerprints))


if __name__ == "__main__":
    main()

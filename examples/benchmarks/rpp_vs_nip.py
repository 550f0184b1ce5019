"""RPP vs NIP on SST-2: dev accuracy of all-MiniLM-L6-v2 fine-tuned dense, one-shot magnitude pruned, NIP and RPP.

- dense: fine-tuned for `--max_steps`, no pruning.
- one-shot: the dense fine-tuned model pruned by global magnitude to each sparsity, no retraining.
- NIP (Guo et al. 2019's baseline): progressive magnitude pruning during fine-tuning, `MagnitudePruningCallback`
  with a `cubic` (or `iterative`) schedule ending at 75% of the run (`--nip_criteria obd` adds OBD-ranked runs).
- RPP: `RPPCallback`, reweighted proximal L1 until 75% of the run, then a hard magnitude prune to the target
  (`--rpp_schedule oneshot`, Guo et al.), or masks growing along NIP's schedule during the proximal window
  (`--rpp_schedule cubic`); `--rpp_criteria obd` ranks the pruning by OBD saliency instead of magnitude.

With `--distill`, the NIP and RPP runs also learn from the dense fine-tuned model (`DistillationTrainer`, loss
`alpha · T²·KL + (1 - alpha) · task`; Sanh et al. 2020 distil their pruned BERTs with alpha 0.9, T 2).

Every run starts from the same pre-trained weights and classifier-head seed with the same steps, batch, sequence
length, learning rate, warm-up and weight decay. Sparsity is over the encoder's Linear weights (hf_prune's default
targets), measured on the final weights. Unless `--rpp_penalty` is given, RPP's λ is set per target by
`RPPConfig`'s rule `λ = (w*²/2 + ε·w*) / Σ lr_t`, with `w*` the pre-trained magnitude at the target quantile and
`Σ lr_t` the summed learning rate of the proximal window.

    python examples/benchmarks/rpp_vs_nip.py --max_train_samples 16000 --max_steps 500 --output rpp_vs_nip.md
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
    setup_sst2,
    training_args,
)
from transformers import TrainingArguments, get_scheduler

from hf_prune import DistillationTrainer, MagnitudePruningCallback, Pruner, PruningConfig
from hf_prune.methods.rpp import RPPCallback, RPPConfig
from hf_prune.schedules import DEFAULT_END_FRACTION, SparsitySchedule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, max_train_samples=16000, max_steps=500)
    parser.add_argument("--sparsities", type=fraction, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--nip_schedule", choices=["cubic", "iterative"], default="cubic")
    parser.add_argument("--nip_criteria", nargs="+", choices=["magnitude", "obd"], default=["magnitude"],
                        help="Runs NIP once per criterion.")
    parser.add_argument("--pruning_frequency", type=positive_int, default=None,
                        help="Steps between the pruning events of NIP and gradual RPP (default: the core's).")
    parser.add_argument("--rpp_penalty", type=float, default=None, help="λ; default: calibrated per target.")
    parser.add_argument("--rpp_penalty_scales", type=float, nargs="+", default=[1.0],
                        help="Runs RPP once per factor, with λ times that factor.")
    parser.add_argument("--rpp_schedule", choices=["oneshot", "cubic", "iterative"], default="oneshot",
                        help="'oneshot': one hard prune at the end of the proximal window (Guo et al.); 'cubic' or "
                             "'iterative': masks grow along that schedule (NIP's events) during the window.")
    parser.add_argument("--rpp_criteria", nargs="+", choices=["magnitude", "obd"], default=["magnitude"],
                        help="Criterion of RPP's pruning: 'magnitude' (Guo et al.) or 'obd' (OBD saliency).")
    parser.add_argument("--fisher_steps", type=positive_int, default=None,
                        help="OBD's gradient window before each pruning event; default: the steps since the "
                             "previous event for gradual schedules, 100 for RPP's one-shot prune.")
    parser.add_argument("--rpp_end_fraction", type=float, default=DEFAULT_END_FRACTION,
                        help="RPP's hard prune comes after this fraction of the steps (NIP keeps the default).")
    parser.add_argument("--skip_nip", action="store_true", help="Runs no NIP fine-tuning.")
    parser.add_argument("--skip_rpp", action="store_true", help="Runs no RPP fine-tuning.")
    parser.add_argument("--skip_dense", action="store_true",
                        help="Reports no dense fine-tuning (nor the one-shot prunes of it): to add RPP rows to a "
                             "table. With --distill the dense model is still trained, as the teacher.")
    parser.add_argument("--distill", action="store_true",
                        help="NIP and RPP distil from the dense fine-tuned model (hf_prune.DistillationTrainer).")
    parser.add_argument("--distill_alpha", type=float, default=0.9, help="Weight of the distillation term.")
    parser.add_argument("--distill_temperature", type=float, default=2.0)
    parser.add_argument("--rpp_epsilon", type=float, default=1e-3)
    parser.add_argument("--rpp_reweight_every", type=positive_int, default=10)
    args = parser.parse_args()
    for criterion in [] if args.skip_rpp else args.rpp_criteria:  # the configs' own checks, before the dense run
        try:
            RPPCallback.check_schedule(rpp_config(args, args.sparsities[0], criterion, args.rpp_penalty or 1.0),
                                       args.max_steps)
        except ValueError as err:
            parser.error(f"RPP options (--rpp_end_fraction {args.rpp_end_fraction}, --rpp_schedule "
                         f"{args.rpp_schedule}, --rpp_penalty {args.rpp_penalty}): {err}")
    return args


def summed_learning_rate(args: TrainingArguments, steps: int) -> float:
    """Σ of the learning rates the Trainer's scheduler gives optimizer steps 1..`steps`."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    warmup = args.get_warmup_steps(args.max_steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=args.max_steps)
    total = 0.0
    for _ in range(steps):
        total += optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return total


def calibrated_penalty(model: torch.nn.Module, sparsity: float, epsilon: float, summed_lr: float) -> float:
    """`(w*²/2 + ε·w*) / Σ lr_t`, `w*` = the magnitude at the `sparsity` quantile (prunes `model` in place)."""
    pruner = Pruner(model, PruningConfig(final_sparsity=sparsity, schedule="oneshot"))
    pruner.prune_to(sparsity)
    w = pruner.thresholds["threshold"]
    return (w * w / 2 + epsilon * w) / summed_lr


def pruning_fields(args: argparse.Namespace, schedule: str, criterion: str, end: int) -> dict:
    """Schedule and criterion fields shared by the NIP and RPP configs of a run ending its pruning at `end`."""
    if schedule == "oneshot":
        return {"schedule": "oneshot", "criterion": criterion, "fisher_steps": args.fisher_steps or 100}
    frequency = SparsitySchedule.from_config(
        PruningConfig(schedule=schedule, end_step=end, pruning_frequency=args.pruning_frequency)).frequency
    return {"schedule": schedule, "pruning_frequency": frequency, "criterion": criterion,
            "fisher_steps": args.fisher_steps or frequency}


def rpp_config(args: argparse.Namespace, sparsity: float, criterion: str, penalty: float) -> RPPConfig:
    """The RPP run's config: its hard prune at `--rpp_end_fraction` of the steps."""
    end = round(args.rpp_end_fraction * args.max_steps)
    return RPPConfig(final_sparsity=sparsity, end_step=end, penalty=penalty, epsilon=args.rpp_epsilon,
                     reweight_every=args.rpp_reweight_every, **pruning_fields(args, args.rpp_schedule, criterion, end))


def main() -> None:
    args = parse_args()
    _, collator, train_set, dev_set = setup_sst2(args)
    print(f"SST-2: {len(train_set)} training rows (random subsample, seed 0), {len(dev_set)} dev rows; "
          f"{args.max_steps} steps x batch {args.batch_size}, seq len {args.max_seq_length}, lr {args.learning_rate}")

    teacher: torch.nn.Module | None = None

    def train(output_dir: str, callback=None) -> torch.nn.Module:
        model = load_model(args.model, args.seed)
        distillation = {} if teacher is None else {
            "trainer_class": DistillationTrainer, "teacher_model": teacher, "alpha": args.distill_alpha,
            "temperature": args.distill_temperature}
        return fine_tune(args, model, train_set, collator, output_dir, [callback] if callback else None,
                         **distillation).model

    results: list[tuple[str, float, float, str]] = []

    def record(method: str, model: torch.nn.Module, note: str = "") -> None:
        sparsity, dev_accuracy = encoder_sparsity(model), accuracy(model, dev_set, collator, 2 * args.batch_size)
        results.append((method, sparsity, dev_accuracy, note))
        print(f"{method}: sparsity {sparsity:.4f}, dev accuracy {dev_accuracy:.4f}" + (f" ({note})" if note else ""))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        if not args.skip_dense or args.distill:
            dense = train(output_dir)
            teacher = dense if args.distill else None
        if not args.skip_dense:
            record("dense fine-tuned", dense)
            for sparsity in args.sparsities:
                pruned = copy.deepcopy(dense)
                Pruner(pruned, PruningConfig(final_sparsity=sparsity, schedule="oneshot")).prune_to(sparsity)
                record("one-shot magnitude", pruned)
        kd = f" + KD (α {args.distill_alpha}, T {args.distill_temperature})" if args.distill else ""
        nip_end = int(DEFAULT_END_FRACTION * args.max_steps)
        for sparsity, criterion in itertools.product([] if args.skip_nip else args.sparsities, args.nip_criteria):
            nip = MagnitudePruningCallback(PruningConfig(final_sparsity=sparsity, end_step=nip_end,
                                                         **pruning_fields(args, args.nip_schedule, criterion,
                                                                          nip_end)))
            record(f"NIP ({args.nip_schedule}" + (f", {criterion})" if criterion != "magnitude" else ")") + kd,
                   train(output_dir, nip), f"pruning every {nip.config.pruning_frequency} steps")
        for sparsity, scale, criterion in itertools.product([] if args.skip_rpp else args.sparsities,
                                                             args.rpp_penalty_scales, args.rpp_criteria):
            penalty = args.rpp_penalty
            if penalty is None:
                summed_lr = summed_learning_rate(training_args(args, output_dir),
                                                 round(args.rpp_end_fraction * args.max_steps))
                penalty = calibrated_penalty(load_model(args.model, args.seed), sparsity, args.rpp_epsilon, summed_lr)
            rpp = RPPCallback(rpp_config(args, sparsity, criterion, scale * penalty))
            model = train(output_dir, rpp)
            if args.rpp_schedule == "oneshot":
                method = "RPP" if criterion == "magnitude" else f"RPP, {criterion} hard prune"
                zeros = "proximal zeros before the hard prune"
            else:
                method = f"RPP, {args.rpp_schedule} masks" + (f", {criterion}" if criterion != "magnitude" else "")
                zeros = f"zeros before the last pruning event (masks every {rpp.config.pruning_frequency} steps)"
            record(method + kd, model, f"λ = {scale * penalty:.3g}; {zeros}: {rpp.proximal_zero_fraction():.2%}")

    table = ("| method | encoder sparsity | SST-2 dev accuracy | notes |\n|---|---|---|---|\n"
             + "\n".join(f"| {m} | {s:.2%} | {a:.2%} | {n} |" for m, s, a, n in results))
    header = (f"all-MiniLM-L6-v2 on SST-2: {len(train_set)} training rows, {len(dev_set)} dev rows, "
              f"{args.max_steps} steps, batch {args.batch_size}, seq len {args.max_seq_length}, "
              f"lr {args.learning_rate}, warm-up {args.warmup_ratio}, weight decay {args.weight_decay}, "
              f"seed {args.seed}; NIP's pruning ends at {DEFAULT_END_FRACTION:.0%} of the run, RPP's at "
              f"{args.rpp_end_fraction:.0%}; {'GPU' if args.gpu else 'CPU'} "
              f"({time.perf_counter() - start:.0f} s in all).\n\n")
    print_and_write(header + table, args.output)


if __name__ == "__main__":
    main()

"""Sparsity schedules: pure functions of the optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .config import PruningConfig

#: The schedule kinds `SparsitySchedule` computes (`PruningConfig.schedule`).
SCHEDULES = ("oneshot", "iterative", "cubic")
#: Cheong & Daniel 2019 prune every 1001 iterations over a 10,000-iteration window.
REFERENCE_WINDOW = 10_000
REFERENCE_FREQUENCY = 1001
#: Without `end_step`, the schedule ends at this fraction of the Trainer's `max_steps`, leaving the rest of the
#: run to recover at the final sparsity.
DEFAULT_END_FRACTION = 0.75


@dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity as a function of the optimizer step, with every default resolved.

    - `oneshot`: `final` from `start` on.
    - `iterative` (Cheong & Daniel 2019): `initial` at `start`, then `(final - initial) / n` more every
      `frequency` steps, `n = (end - start) // frequency`, so `final` is reached at `start + n * frequency`.
    - `cubic` (Zhu & Gupta 2017): `s_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3`,
      evaluated at the pruning events `start + k * frequency` and at `end`.

    Before `start` the target is 0.
    """

    kind: str
    initial: float
    final: float
    start: int
    end: int
    frequency: int

    @classmethod
    def from_config(cls, config: PruningConfig, max_steps: int | None = None) -> SparsitySchedule:
        """Fills in `end_step` / `pruning_frequency` defaults and checks the schedule fits in `max_steps`."""
        start = config.start_step
        end = start if config.schedule == "oneshot" else resolve_end_step(start, config.end_step, max_steps)
        oneshot = " (= start_step for oneshot)" if config.schedule == "oneshot" else ""
        check_fits(end, max_steps, f"`end_step` is {end}{oneshot}")
        frequency = config.pruning_frequency
        if frequency is None:
            frequency = max(1, round(REFERENCE_FREQUENCY * (end - start) / REFERENCE_WINDOW))
        if config.schedule != "oneshot" and frequency > end - start:
            raise ValueError(f"`pruning_frequency` ({frequency}) is longer than the schedule window "
                             f"end_step - start_step = {end - start}; accepted: 1..{end - start}.")
        return cls(config.schedule, config.initial_sparsity, config.final_sparsity, start, end, frequency)

    def __call__(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if self.kind == "oneshot" or step >= self.end:
            return self.final
        events = (step - self.start) // self.frequency
        if self.kind == "iterative":
            increments = (self.end - self.start) // self.frequency
            if events >= increments:  # exactly final: interpolating can round above it (0.1 -> 0.9: 0.9 + 1e-16)
                return self.final
            return self.initial + (self.final - self.initial) * events / increments
        progress = (events * self.frequency) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3


def resolve_end_step(start_step: int, end_step: int | None, max_steps: int | None) -> int:
    """`end_step`, or by default `min(start_step + 10_000, int(0.75 * max_steps))`: where a schedule that starts at
    `start_step` ends when its config leaves the end to the Trainer run.

    Raises:
        ValueError: when `end_step` is None and there is no `max_steps` to derive it from, or the default leaves
            no room after `start_step`.
    """
    if end_step is not None:
        return end_step
    if max_steps is None or max_steps <= 0:
        raise ValueError("`end_step` is None and there is no Trainer `max_steps` to derive it from; set `end_step`.")
    end = min(start_step + REFERENCE_WINDOW, int(DEFAULT_END_FRACTION * max_steps))
    if end <= start_step:
        remedy = "Lower `start_step`, or set `end_step`" if start_step > 0 else "Set `end_step`, or train longer"
        raise ValueError(f"`start_step` ({start_step}) leaves no room for a schedule within max_steps ({max_steps}): "
                         f"the default end_step (0.75 · max_steps) would be {end}. {remedy}.")
    return end


def check_fits(last_step: int, max_steps: int | None, what: str) -> None:
    """The one check that a schedule fits in the run: its last event, `last_step`, must be at most `max_steps`
    (unknown or non-positive `max_steps` pass). `what` says in the error where `last_step` comes from."""
    if max_steps is not None and max_steps > 0 and last_step > max_steps:
        raise ValueError(f"The schedule cannot finish inside max_steps ({max_steps}): {what}; accepted: a last "
                         "step <= max_steps. End the schedule earlier (`end_step`, `start_step`), or train for more "
                         "steps (`max_steps`, `num_train_epochs`).")

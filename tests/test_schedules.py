import pytest

from hf_prune import PruningConfig, SparsitySchedule


def schedule(max_steps: int | None = None, **kwargs) -> SparsitySchedule:
    return SparsitySchedule.from_config(PruningConfig(**kwargs), max_steps=max_steps)


def test_oneshot_prunes_to_final_at_start():
    s = schedule(schedule="oneshot", final_sparsity=0.8, start_step=5)
    assert [s(t) for t in (0, 4, 5, 6, 10_000)] == [0.0, 0.0, 0.8, 0.8, 0.8]


def test_iterative_follows_cheong_and_daniel():
    # X at the start, then (Y - X) / 9 every 1001 steps, Y from step 9009 on (9 increments in 10,000 steps).
    s = schedule(schedule="iterative", initial_sparsity=0.5, final_sparsity=0.9, start_step=0, end_step=10_000,
                 pruning_frequency=1001)
    for t in range(0, 12_000, 7):
        expected = 0.5 + (0.9 - 0.5) * min(9, t // 1001) / 9
        assert s(t) == pytest.approx(expected)
    assert s(9008) < 0.9 and s(9009) == pytest.approx(0.9)


@pytest.mark.parametrize("initial", [0.0, 0.1, 0.5])
def test_iterative_reaches_final_exactly_never_above(initial):
    # 0.1 + 0.8 * 3 / 3 is 0.9000000000000001 in floats: one weight too many at a rounding boundary
    s = schedule(schedule="iterative", initial_sparsity=initial, final_sparsity=0.9, start_step=0, end_step=10,
                 pruning_frequency=3)
    assert [s(t) for t in (9, 10, 11)] == [0.9, 0.9, 0.9]
    assert all(s(t) <= 0.9 for t in range(12))


def test_cubic_follows_zhu_and_gupta():
    s_i, s_f, t0, n, dt = 0.1, 0.85, 100, 8, 50
    s = schedule(schedule="cubic", initial_sparsity=s_i, final_sparsity=s_f, start_step=t0, end_step=t0 + n * dt,
                 pruning_frequency=dt)
    assert s(t0 - 1) == 0.0
    for t in range(t0, t0 + n * dt + 200):
        event = t0 + min(n * dt, (t - t0) // dt * dt)
        expected = s_f + (s_i - s_f) * (1 - (event - t0) / (n * dt)) ** 3
        assert s(t) == pytest.approx(expected)
    assert s(t0) == pytest.approx(s_i) and s(t0 + n * dt) == pytest.approx(s_f)


def test_defaults_follow_cheong_and_daniel_on_long_runs_and_scale_down():
    long = schedule(schedule="iterative", initial_sparsity=0.5, final_sparsity=0.9, max_steps=20_000)
    assert (long.start, long.end, long.frequency) == (0, 10_000, 1001)
    short = schedule(schedule="iterative", final_sparsity=0.9, max_steps=400)
    assert short.end == 300 and short.frequency == 30 and short(short.end) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"end_step": 500, "max_steps": 100}, r"cannot finish inside max_steps \(100\): `end_step` is 500; .* End "
                                              r"the schedule earlier \(`end_step`, `start_step`\), or train for more "
                                              r"steps \(`max_steps`, `num_train_epochs`\)\."),
        ({"schedule": "oneshot", "start_step": 200, "max_steps": 100}, "cannot finish inside max_steps"),
        ({"end_step": 50, "pruning_frequency": 60}, "pruning_frequency"),
        ({}, "end_step"),
        ({"start_step": 90, "max_steps": 100}, "Lower `start_step`, or set `end_step`"),
        ({"max_steps": 1}, r"would be 0\. Set `end_step`, or train longer"),  # start_step 0 cannot be lowered
    ],
)
def test_schedules_that_cannot_run_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedule(**kwargs)

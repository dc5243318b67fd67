"""Schedules as pure functions of the step, against DINO's `cosine_scheduler` re-derived here with numpy."""
import math

import numpy as np
import pytest

from ssl_vit.errors import SslVitError
from ssl_vit.schedules import cosine, linear_warmup_then_constant


def reference_cosine_part(total: int, start: float, end: float, warmup: int) -> np.ndarray:
    """The post-warm-up part of DINO's cosine_scheduler: end + ½(start − end)(1 + cos(π i / n)), i < n."""
    iters = np.arange(total - warmup)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * iters / len(iters)))


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine(50, 100, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine(10_000, 100, 1.0, 0.1) == pytest.approx(0.1)
    last = cosine(99, 100, 1.0, 0.1)
    assert 0.1 < last < 0.1 + 1e-3


def test_cosine_matches_dino_reference_after_warmup():
    total, warmup = 37, 5
    ours = np.array([cosine(s, total, 2e-3, 1e-6, warmup_steps=warmup, warmup_start=1e-4) for s in range(total)])
    np.testing.assert_allclose(ours[warmup:], reference_cosine_part(total, 2e-3, 1e-6, warmup), rtol=1e-12)
    assert np.all(np.diff(ours[warmup:]) < 0)


def test_cosine_warmup_values():
    values = [cosine(s, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) for s in range(12)]
    np.testing.assert_allclose(values[:11], 0.2 + 0.8 * np.arange(11) / 10, atol=1e-12)
    assert values[10] == pytest.approx(1.0)  # the ramp ends where the cosine starts, at `start`
    assert values[11] < 1.0
    assert cosine(0, 100, 5e-4, 1e-6, warmup_steps=10) == 0.0  # default warmup_start


def test_cosine_warmup_longer_than_run_is_clipped():
    values = [cosine(s, 4, 1.0, 0.0, warmup_steps=8) for s in range(5)]
    assert values == pytest.approx([0.0, 0.25, 0.5, 0.75, 0.0])


def test_cosine_increasing_schedule_like_ema_momentum():
    values = [cosine(s, 200, 0.996, 1.0) for s in range(200)]
    assert values[0] == pytest.approx(0.996)
    assert values[100] == pytest.approx(0.998)
    assert np.all(np.diff(values) > 0) and values[-1] < 1.0


def test_linear_warmup_then_constant():
    values = [linear_warmup_then_constant(s, 30, 0.04, 0.07) for s in (0, 15, 29, 30, 31, 1000)]
    assert values == pytest.approx([0.04, 0.055, 0.04 + 0.03 * 29 / 30, 0.07, 0.07, 0.07])
    assert linear_warmup_then_constant(0, 0, 0.04, 0.07) == 0.07


@pytest.mark.parametrize("call", [lambda: cosine(0, 0, 1.0, 0.0), lambda: cosine(0, 10, 1.0, 0.0, warmup_steps=-1),
                                  lambda: linear_warmup_then_constant(0, -2, 0.04, 0.07)])
def test_bad_schedule_arguments(call):
    with pytest.raises(SslVitError, match="schedule:"):
        call()


def test_schedules_are_pure():
    """A value depends on the step alone, not on the steps asked before: a resumed run asks from the middle."""
    from ssl_vit.config import Recipe
    from ssl_vit.train.trainer import trainer_schedules

    recipe = Recipe()
    recipe.optim.warmup_epochs, recipe.optim.weight_decay_end = 1.0, 0.4
    schedules = {**trainer_schedules(recipe, 50, 10, 256),
                 "teacher_temp": lambda s: linear_warmup_then_constant(s, 30, 0.04, 0.07)}
    steps = list(range(60))
    shuffled = np.random.default_rng(0).permutation(steps).tolist()
    for name, f in schedules.items():
        in_order = [f(s) for s in steps]
        out_of_order = dict(zip(shuffled, [f(s) for s in shuffled]))
        assert [out_of_order[s] for s in steps] == in_order, name
        assert len(set(in_order)) > 2, name  # a schedule that moves
    assert math.isclose(cosine(7, 50, 1.0, 0.0, 3), cosine(7.0, 50, 1.0, 0.0, 3))

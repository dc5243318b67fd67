"""Schedules as pure functions of the global optimizer step (lr, weight decay, EMA momentum, teacher temperature).

`cosine` follows DINO's `cosine_scheduler` (Caron et al. 2021, App. "Implementation details"; Loshchilov & Hutter
2017, SGDR Eq. 5): a linear warm-up from `warmup_start` to `start`, then a half-cosine from `start` to `end`, with
one value per step. One deliberate difference: DINO's warm-up is `linspace(warmup_start, start, warmup_steps)`, which
reaches `start` one step before the cosine begins (so `start` appears twice); here the ramp reaches `start` exactly
at step `warmup_steps`, where the cosine takes over, so no value repeats at the seam.
"""
import math

from ssl_vit.errors import SslVitError


def _check(total: int, warmup_steps: int) -> None:
    if total <= 0:
        raise SslVitError(f"schedule: the total number of steps must be positive, got {total}")
    if warmup_steps < 0:
        raise SslVitError(f"schedule: warm-up steps must be ≥ 0, got {warmup_steps}")


def cosine(step: int, total: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Value at `step` of a run of `total` steps: `warmup_start → start` linearly over `warmup_steps` steps, then
    `start → end` along a half-cosine that would reach `end` at step `total` (the last step, `total - 1`, is just
    short of it, as in DINO). A warm-up longer than the run is clipped to the run. Steps past the run give `end`."""
    _check(total, warmup_steps)
    warmup_steps = min(warmup_steps, total)
    step = max(int(step), 0)
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    if step >= total:
        return end
    progress = (step - warmup_steps) / (total - warmup_steps)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """`start → end` linearly over `warmup_steps` steps, then `end` (DINO's teacher temperature, Sec. 3.1)."""
    if warmup_steps < 0:
        raise SslVitError(f"schedule: warm-up steps must be ≥ 0, got {warmup_steps}")
    step = max(int(step), 0)
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps

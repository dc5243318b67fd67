"""Bootstrap intervals and paired differences against closed forms and simulated repeats."""
import numpy as np
import pytest

from ssl_vit.errors import SslVitError
from ssl_vit.eval.uncertainty import bootstrap_accuracy, mean_std, paired_difference


def test_bootstrap_matches_the_binomial_standard_error():
    rng = np.random.default_rng(1)
    hits = rng.random(2000) < 0.3
    est = bootstrap_accuracy(hits, n_boot=4000)
    p = hits.mean()
    assert est.value == pytest.approx(p * 100)
    assert est.std == pytest.approx(np.sqrt(p * (1 - p) / len(hits)) * 100, rel=0.08)
    assert est.low < est.value < est.high
    assert est.high - est.low == pytest.approx(2 * 1.96 * est.std, rel=0.1)


def test_interval_covers_the_truth_at_its_level():
    """Over 200 simulated test sets, the 95 % interval of a 60 %-accurate model holds 60 in ~95 % of them."""
    rng = np.random.default_rng(2)
    covered = [bootstrap_accuracy(rng.random(400) < 0.6, n_boot=500, seed=i) for i in range(200)]
    rate = np.mean([e.low <= 60 <= e.high for e in covered])
    assert 0.89 <= rate <= 0.99


def test_pairing_removes_what_two_models_share():
    """B = A with 3 % of its misses turned into hits: the paired interval is tight around +3 and excludes 0, while
    two unpaired intervals would overlap."""
    rng = np.random.default_rng(3)
    a = rng.random(1000) < 0.5
    b = a.copy()
    b[np.flatnonzero(~a)[:30]] = True
    diff = paired_difference(b, a, n_boot=2000)
    assert diff.value == pytest.approx(3.0)
    assert diff.excludes_zero()
    assert diff.std < 0.7
    unpaired = np.hypot(bootstrap_accuracy(a).std, bootstrap_accuracy(b).std)
    assert unpaired > 2 * diff.std
    assert str(diff) == f"+3.0 ± {diff.std:.1f}"


def test_no_difference_is_not_called_one():
    rng = np.random.default_rng(4)
    a, b = rng.random(500) < 0.4, rng.random(500) < 0.4
    flagged = sum(paired_difference(rng.permutation(a), rng.permutation(b), n_boot=300, seed=i).excludes_zero()
                  for i in range(100))
    assert flagged <= 12  # ~5 % false positives at 95 %


def test_runs_add_their_spread():
    """Over label draws, the run-to-run spread of the difference adds to the test-image bootstrap's."""
    rng = np.random.default_rng(5)
    a = rng.random((3, 800)) < 0.5
    b = a.copy()
    b[0, :40] = ~b[0, :40]  # one draw differs a lot, the others not at all
    runs = paired_difference(a, b)
    images_only = paired_difference(a.mean(0), b.mean(0))  # the same per-image differences, no runs
    run_spread = np.std(a.mean(1) - b.mean(1), ddof=1) * 100 / np.sqrt(3)
    assert runs.value == pytest.approx(images_only.value)
    assert runs.std == pytest.approx(np.hypot(images_only.std, run_spread))
    assert runs.low < runs.value < runs.high


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(SslVitError, match="same runs and test images"):
        paired_difference(np.ones(5), np.ones(6))
    with pytest.raises(SslVitError, match="non-empty"):
        bootstrap_accuracy([])
    assert mean_std([50.0]) == (50.0, 0.0)
    assert mean_std([40.0, 50.0, 60.0]) == (50.0, 10.0)

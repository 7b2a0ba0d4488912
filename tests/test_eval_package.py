"""training/eval/ beyond the quantizer's end-to-end tests: the one tracker-scalar flattener, Wilson intervals, the
VLA's majority baseline, and the package's layout rules (module and function sizes, no imports from scripts)."""

import math

import numpy as np
import pytest

from support import REPO_ROOT
from training.eval import scalar_metrics, wilson_interval
from training.eval.vla import majority_accuracy, majority_tokens



# ------------------------------------------------------------------------------------------ scalar_metrics
def test_scalar_metrics_flattens_nested_dicts_with_one_rule():
    tree = {
        "step": 7,
        "summary": {"psnr_above_copy": True, "all_codes_used_2pct": False, "psnr_gain_db": 1.5, "probes_note": ""},
        "probes": {"r2": {"latents": {"linear": {"delta_x": 0.25, "delta_y": None}}}},
        "codebook": {"usage": [[0.5, 0.5]], "perplexity": 2, "min_code_fraction": float("nan")},
        "reconstruction": {"copy_mse": float("inf"), "prediction_mse": -float("inf"), "copy_psnr_of_mean_mse": 20.0},
        "plots": {"codebook_usage": "eval/codebook_usage.png"},
    }
    flat = scalar_metrics(tree, "eval")
    assert flat == {
        "eval/step": 7.0,
        "eval/summary/psnr_above_copy": 1.0,  # bools become 0.0 / 1.0
        "eval/summary/all_codes_used_2pct": 0.0,
        "eval/summary/psnr_gain_db": 1.5,
        "eval/probes/r2/latents/linear/delta_x": 0.25,  # None is left out
        "eval/codebook/perplexity": 2.0,  # lists and NaN left out
        "eval/reconstruction/copy_psnr_of_mean_mse": 20.0,  # +-inf left out
    }
    assert all(type(v) is float for v in flat.values())  # ints and bools too: trackers get one type
    assert list(flat) == list(scalar_metrics(tree))  # "eval" is the default prefix, and the order is the tree's
    assert scalar_metrics({"a": {"b": 1}}, "") == {"a/b": 1.0}
    assert scalar_metrics({}) == {}


def test_scalar_metrics_of_a_flat_vla_eval_record():
    """The VLA's evaluation record: its numbers under eval/, its per-position lists left out (as the inline filter
    it replaces did), and a diverged loss left out rather than logged as NaN."""
    record = {"eval_frames": 20, "loss": float("nan"), "token_accuracy": 0.25,
              "token_accuracy_per_position": [0.5, 0.0], "majority_baseline_accuracy": 0.5, "step": 4}
    assert scalar_metrics(record, "eval") == {"eval/eval_frames": 20.0, "eval/token_accuracy": 0.25,
                                              "eval/majority_baseline_accuracy": 0.5, "eval/step": 4.0}


# ------------------------------------------------------------------------------------------ wilson_interval
Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_by_hand(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(7, 10), (0, 10), (10, 10), (1, 1), (37, 50), (500, 1000)])
def test_wilson_interval_matches_the_formula(k, n):
    low, high = wilson_interval(k, n)
    expected_low, expected_high = wilson_by_hand(k, n)
    assert low == pytest.approx(max(expected_low, 0.0), abs=1e-12)
    assert high == pytest.approx(min(expected_high, 1.0), abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert type(low) is float and type(high) is float


def test_wilson_interval_known_values_and_confidence_levels():
    # Values worked out from the formula above: 7/10 at 95%; 0/10 at 95% has the upper end z^2 / (n + z^2).
    assert wilson_interval(7, 10) == pytest.approx((0.396778147461145, 0.892208732593699), abs=1e-12)
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z_95**2 / (10 + Z_95**2)), abs=1e-12)
    z_90 = 1.6448536269514722
    assert wilson_interval(0, 20, confidence=0.90)[1] == pytest.approx(z_90**2 / (20 + z_90**2), abs=1e-12)
    narrow, wide = wilson_interval(30, 60, 0.80), wilson_interval(30, 60, 0.99)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    assert wilson_interval(np.int64(3), np.int64(4)) == wilson_interval(3, 4)  # numpy counts from np.sum


def test_wilson_interval_refuses_no_trials_and_impossible_counts():
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(-1, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(3, 10, confidence=95)
    with pytest.raises(TypeError):
        wilson_interval(2.5, 10)


# ------------------------------------------------------------------------------------------ the VLA baseline
def test_majority_baseline_per_position():
    train = np.array([[1, 0, 3], [1, 2, 3], [0, 2, 3], [1, 2, 0]])  # majority per position: 1, 2, 3
    held_out = np.array([[1, 2, 0], [0, 2, 3]])
    np.testing.assert_array_equal(majority_tokens(train), [1, 2, 3])
    assert majority_accuracy(train, held_out) == pytest.approx(4 / 6)
    assert majority_accuracy(train, held_out, per_position=True) == [0.5, 1.0, 0.5]
    np.testing.assert_array_equal(majority_tokens(np.array([[0], [1]])), [0])  # a tie goes to the lower token


# ------------------------------------------------------------------------------------------ the package's layout

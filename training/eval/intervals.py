"""Confidence intervals for success rates (the closed-loop evaluation: k successes in n episodes).

    wilson_interval(7, 10)          # (0.3968, 0.8922): 7 of 10 episodes succeeded, 95% interval
    wilson_interval(0, 20, 0.9)     # (0.0, 0.1191)

The Wilson score interval stays inside [0, 1] and keeps a sensible width at 0 or n successes, where the normal
approximation (p +- z sqrt(p(1-p)/n)) collapses to a single point. It comes from scipy (`binomtest(k, n)
.proportion_ci(method="wilson")`), not from a formula of ours.
"""

from __future__ import annotations

import operator


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a success probability after `successes` successes in `n` trials.

    Args:
        successes: k, an integer in [0, n].
        n: the number of trials, at least 1.
        confidence: the interval's confidence level, in (0, 1).
    Returns:
        (low, high) Python floats with 0 <= low <= k/n <= high <= 1.
    Raises:
        ValueError: for n = 0 (no trials say nothing about the rate: an evaluation that ran no episode is a bug of
        its caller, which an uninformative (0, 1) would hide), for k outside [0, n], or a confidence outside (0, 1).
        TypeError: for non-integer counts.
    """
    successes, n = operator.index(successes), operator.index(n)
    if n < 1:
        raise ValueError(f"wilson_interval needs at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    # Imported here, not at the top: scipy.stats takes about a second to import, every training script imports
    # training.eval, and only the closed-loop evaluation asks for intervals (the same reason plots.py imports
    # matplotlib inside its functions). Nothing circular is involved.
    from scipy.stats import binomtest

    interval = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


__all__ = ["wilson_interval"]

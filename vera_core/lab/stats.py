"""How sure a comparison is: mean ± std over seeds, 95% intervals (t over seeds, bootstrap over test examples),
the paired difference of two methods on the same test rows (bootstrap over seeds and test examples), and its
verdict against a margin.

A run's test examples are rows of numbers whose column sums give its metric (`statistic(sums, n)`): a 0/1
"correct" column for accuracy, BLEU's n-gram counts for BLEU. Resampling examples then only re-weights rows.

    lo, hi = t_interval([79.1, 80.3, 78.8])
    paired_difference([vera_rows], [lora_rows], accuracy_statistic)   # {"diff_mean", "ci95", "ci_method"}
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), from the standard table; between listed df the next
# smaller df is used (a slightly wider, so conservative, interval); beyond 120, the normal 1.960.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
MARGIN = 1.0  # points: "matches" means the difference is not below -1 point (the project's bar)
VERDICTS = ("matches within 1 point", "behind", "cannot tell")
PERCENT = (0.0, 100.0)  # the range of every headline metric (accuracy, BLEU)
# What an interval covers, recorded beside it: a t-interval over seeds leaves the test set's sampling error out, a
# bootstrap over one run's examples leaves the seed spread out, the two-level pair bootstrap holds both.
CI_SEEDS = "t over seeds (seed-to-seed spread only; test-set sampling error not included)"
CI_EXAMPLES = "bootstrap over test examples"
CI_SEEDS_AND_EXAMPLES = "bootstrap over seeds and test examples"

Statistic = Callable[[np.ndarray, int], float]  # (column sums of the chosen examples, their count) -> metric


def t_quantile(df: int) -> float:
    """t_{0.975}(df) from the table (the next smaller listed df between entries; 1.960 beyond 120)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}.")
    if df > 120:
        return 1.960
    return T975[max(k for k in T975 if k <= df)]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation); the std is None for a single value (nothing to spread)."""
    if not values:
        raise ValueError("mean and std of no values are undefined.")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_interval(values: Sequence[float], bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """95% t-interval of the mean: mean ± t_{0.975}(n-1) · std / √n, cut to `bounds` (the metric's possible range)
    when given: with 2 seeds t is 12.7 and an accuracy interval can reach past 100%, which no mean can."""
    mean, std = mean_std(values)
    if std is None:
        raise ValueError("a t interval needs at least 2 values; with one, bootstrap over test examples instead.")
    half = t_quantile(len(values) - 1) * std / math.sqrt(len(values))
    if bounds is None:
        return mean - half, mean + half
    return max(mean - half, bounds[0]), min(mean + half, bounds[1])


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) how often each of n examples is drawn in each bootstrap resample (with replacement)."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one test example.")
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])


def _per_run(runs: Sequence[np.ndarray], statistic: Statistic, counts: np.ndarray) -> np.ndarray:
    """(runs, n_boot) the metric of every run (seed) on every resample of the examples they share."""
    n = counts.shape[1]
    return np.array([[statistic(row, n) for row in counts @ rows] for rows in runs])


def _resampled(runs: Sequence[np.ndarray], statistic: Statistic, counts: np.ndarray) -> np.ndarray:
    """(n_boot,) the metric of every resample, averaged over the runs (seeds) sharing those examples."""
    return _per_run(runs, statistic, counts).mean(axis=0)


def _check_runs(runs: Sequence[np.ndarray]) -> None:
    if not runs:
        raise ValueError("no runs to bootstrap.")
    if len({len(r) for r in runs}) != 1:
        raise ValueError(f"runs cover different test rows ({sorted({len(r) for r in runs})}); pairing needs the same.")


def bootstrap_interval(runs: Sequence[np.ndarray], statistic: Statistic, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the metric (mean over `runs`, each an (n, k) array of the same n examples)."""
    _check_runs(runs)
    values = _resampled([np.asarray(r, float) for r in runs], statistic, resample_counts(len(runs[0]), n_boot, seed))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def paired_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], statistic: Statistic, n_boot: int = 2000,
                      seed: int = 0, over_seeds: bool = True) -> dict:
    """A − B on the same test examples, a[i] and b[i] trained with the same seed: {"diff_mean" (mean over seeds of
    A's metric minus B's), "ci95" [low, high], "ci_method"}.

    Two-level paired bootstrap: each replicate draws the seeds with replacement and one resample of the test
    examples (the same examples for every drawn seed of both methods), and takes the difference of the two methods'
    means over exactly those draws, so the interval holds both the seed-to-seed spread and the test set's sampling
    error. over_seeds=False keeps every seed in every replicate (test examples only), which leaves the seed spread
    out; with one seed, or seeds that agree exactly, the two intervals are the same."""
    _check_runs([*a, *b])
    if len(a) != len(b):
        raise ValueError(f"{len(a)} runs of A against {len(b)} of B; pair them by seed (one run per seed each).")
    a, b = [np.asarray(r, float) for r in a], [np.asarray(r, float) for r in b]
    n, k = len(a[0]), len(a)
    counts = resample_counts(n, n_boot, seed)
    per_a, per_b = _per_run(a, statistic, counts), _per_run(b, statistic, counts)  # (k, n_boot)
    if over_seeds:
        # Its own stream, so the examples drawn are those of the examples-only interval.
        picks = np.random.default_rng([seed, 1]).integers(0, k, (n_boot, k))  # (n_boot, k) seed indices
        replicate = np.arange(n_boot)[:, None]
        diffs = (per_a[picks, replicate] - per_b[picks, replicate]).mean(axis=1)
    else:
        diffs = per_a.mean(axis=0) - per_b.mean(axis=0)
    full = np.ones((1, n))
    diff = float(_resampled(a, statistic, full)[0] - _resampled(b, statistic, full)[0])
    method = CI_SEEDS_AND_EXAMPLES if over_seeds and k > 1 else CI_EXAMPLES
    return {"diff_mean": diff, "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
            "ci_method": method}


def verdict(low: float, high: float) -> str:
    """The interval of A − B read against −1 point: "matches within 1 point" (low ≥ −1), "behind" (high < −1),
    else "cannot tell" (it straddles −1)."""
    if low > high:
        raise ValueError(f"an interval's low end ({low}) is above its high end ({high}).")
    if low >= -MARGIN:
        return VERDICTS[0]
    return VERDICTS[1] if high < -MARGIN else VERDICTS[2]


def accuracy_statistic(sums: np.ndarray, n: int) -> float:
    """Accuracy in % from the summed 0/1 "correct" column."""
    return 100.0 * float(sums[0]) / n

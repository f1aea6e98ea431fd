"""The statistics of an honest comparison, against hand computations: t-intervals, bootstrap, paired differences,
verdicts, and BLEU from per-example statistics."""
import math

import numpy as np
import pytest

from vera_core.lab.metrics import bleu, bleu_from_statistics, bleu_statistics
from vera_core.lab.stats import (
    PERCENT,
    accuracy_statistic,
    bootstrap_interval,
    mean_std,
    paired_difference,
    resample_counts,
    t_interval,
    t_quantile,
    verdict,
)


def test_t_interval_is_mean_plus_minus_table_quantile_times_standard_error():
    values = [79.0, 81.0, 80.0]  # mean 80, sample std 1, df 2: t = 4.303
    assert mean_std(values) == (80.0, 1.0)
    low, high = t_interval(values)
    assert low == pytest.approx(80 - 4.303 / math.sqrt(3)) and high == pytest.approx(80 + 4.303 / math.sqrt(3))
    assert (t_quantile(1), t_quantile(4), t_quantile(22), t_quantile(500)) == (12.706, 2.776, 2.086, 1.960)
    assert mean_std([5.0]) == (5.0, None)
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval([5.0])
    with pytest.raises(ValueError, match="no values"):
        mean_std([])


def test_a_two_seed_interval_stops_at_the_metrics_range():
    values = [60.0, 90.0]  # mean 75, std 21.2, df 1: t = 12.706, half-width 190.6 points
    low, high = t_interval(values)
    assert low == pytest.approx(75 - 12.706 * 15) and high == pytest.approx(75 + 12.706 * 15)
    assert t_interval(values, PERCENT) == (0.0, 100.0)
    assert t_interval([79.0, 81.0, 80.0], PERCENT) == t_interval([79.0, 81.0, 80.0])  # inside: unchanged


def test_bootstrap_is_deterministic_and_brackets_the_accuracy():
    correct = np.array([[1.0]] * 80 + [[0.0]] * 20)  # 80% accuracy on 100 rows
    counts = resample_counts(100, 5, seed=0)
    assert counts.shape == (5, 100) and (counts.sum(axis=1) == 100).all()
    low, high = bootstrap_interval([correct], accuracy_statistic, n_boot=2000, seed=0)
    assert (low, high) == bootstrap_interval([correct], accuracy_statistic, n_boot=2000, seed=0)
    # the binomial standard error is 4 points: the percentile interval is about 80 ± 7.8
    assert 70 < low < 74 and 86 < high < 90
    assert bootstrap_interval([np.ones((10, 1))], accuracy_statistic, n_boot=50) == (100.0, 100.0)


def test_paired_difference_cancels_what_both_methods_share():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 2, (200, 1)).astype(float)
    a = b.copy()
    a[:4] = 1.0 - a[:4]  # A differs from B on 4 of 200 rows only
    diff = paired_difference([a], [b], accuracy_statistic, n_boot=1000, seed=0)
    expected = 100 * (a.sum() - b.sum()) / 200
    assert diff["diff_mean"] == pytest.approx(expected)
    low, high = diff["ci95"]
    assert low <= expected <= high and high - low <= 4.0 + 1e-9  # at most the 4 differing rows can move it
    same = paired_difference([a, a], [a, a], accuracy_statistic, n_boot=100)
    assert same == {"diff_mean": 0.0, "ci95": [0.0, 0.0], "ci_method": "bootstrap over seeds and test examples"}
    with pytest.raises(ValueError, match="different test rows"):
        paired_difference([a], [b[:10]], accuracy_statistic)
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_difference([a, a], [b], accuracy_statistic)


def _correct(n_right: int, n: int, shift: int = 0) -> np.ndarray:
    """An (n, 1) 0/1 "correct" column with n_right ones, rolled by `shift` (a different run, same accuracy)."""
    return np.roll(np.array([[1.0]] * n_right + [[0.0]] * (n - n_right)), shift, axis=0)


def test_the_pair_interval_widens_when_the_seeds_disagree():
    # LoRA 70% on every seed; VeRA's seeds 60%, 70%, 80% on 400 rows: the seed spread (std 10 points) dominates
    # the test-sampling error of the mean over seeds.
    lora = [_correct(280, 400, shift) for shift in (0, 5, 9)]
    vera = [_correct(240, 400), _correct(280, 400, 3), _correct(320, 400, 7)]
    two_level = paired_difference(vera, lora, accuracy_statistic, n_boot=2000, seed=0)
    examples = paired_difference(vera, lora, accuracy_statistic, n_boot=2000, seed=0, over_seeds=False)
    assert two_level["diff_mean"] == examples["diff_mean"] == pytest.approx(0.0)
    assert two_level["ci_method"] == "bootstrap over seeds and test examples"
    assert examples["ci_method"] == "bootstrap over test examples"
    wide, narrow = (d["ci95"][1] - d["ci95"][0] for d in (two_level, examples))
    # Drawing 3 of the seeds {-10, 0, +10} with replacement gives a mean spread of std 10·sqrt(2/3)/sqrt(3) = 4.7
    # points, so about ±9 points; the examples-only interval stays within a few points.
    assert narrow < 8.0 and 14.0 < wide < 24.0
    assert two_level["ci95"][0] < -5.0 < 5.0 < two_level["ci95"][1]


def test_the_pair_interval_is_the_examples_only_one_when_the_seeds_agree():
    rng = np.random.default_rng(3)
    vera_run, lora_run = (rng.integers(0, 2, (300, 1)).astype(float) for _ in range(2))
    two_level = paired_difference([vera_run] * 3, [lora_run] * 3, accuracy_statistic, n_boot=500, seed=4)
    examples = paired_difference([vera_run] * 3, [lora_run] * 3, accuracy_statistic, n_boot=500, seed=4,
                                 over_seeds=False)
    one_seed = paired_difference([vera_run], [lora_run], accuracy_statistic, n_boot=500, seed=4)
    assert two_level["ci95"] == examples["ci95"] == one_seed["ci95"]
    assert two_level["ci95"][1] - two_level["ci95"][0] > 5.0  # a real interval, not a degenerate one
    assert one_seed["ci_method"] == "bootstrap over test examples"  # one seed: nothing to resample there


def test_verdict_reads_the_interval_against_minus_one_point():
    assert verdict(-0.8, 2.6) == "matches within 1 point"
    assert verdict(-1.0, 0.5) == "matches within 1 point"  # the bound itself counts as matching
    assert verdict(-3.0, -1.2) == "behind"
    assert verdict(-2.0, 0.3) == "cannot tell"
    assert verdict(-1.5, -1.0) == "cannot tell"
    with pytest.raises(ValueError, match="above its high end"):
        verdict(1.0, -1.0)


def test_bleu_from_summed_statistics_equals_sacrebleu_on_any_subset():
    preds = ["the cat sat on the mat", "a dog runs", "hello world there", "red"]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["a dog is running"], ["hello there world"],
            ["it is red"]]
    rows = np.array(bleu_statistics(preds, refs))
    assert rows.shape == (4, 10)
    assert bleu_from_statistics(rows.sum(axis=0)) == pytest.approx(bleu(preds, refs), abs=1e-9)
    assert bleu_from_statistics(rows[[0, 2]].sum(axis=0)) == pytest.approx(bleu([preds[0], preds[2]],
                                                                                  [refs[0], refs[2]]), abs=1e-9)

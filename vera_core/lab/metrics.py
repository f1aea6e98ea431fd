"""Task metrics on a 0-100 scale: accuracy for classification, corpus BLEU and ROUGE-L for generation.

Generation data can hold several references per input (E2E: rows sharing a `group`); an output is scored against
all references of its input, as the E2E challenge does, never against one reference picked at random.
"""
from __future__ import annotations

from typing import Sequence

import sacrebleu
from rouge_score import rouge_scorer


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percentage of predictions equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels; give one prediction per label.")
    if not labels:
        raise ValueError("accuracy of an empty set is undefined; give at least one labelled row.")
    return 100.0 * sum(int(p) == int(t) for p, t in zip(predictions, labels)) / len(labels)


def group_references(rows: Sequence[dict]) -> list[tuple[str, list[str]]]:
    """Causal-LM rows -> [(prompt, [every response of that group])], in order of each group's first row.

    Rows without a `group` are grouped by their prompt.
    """
    groups: dict[str, tuple[str, list[str]]] = {}
    for row in rows:
        key = row.get("group") or row["prompt"]
        groups.setdefault(key, (row["prompt"], []))[1].append(row["response"])
    return list(groups.values())


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (13a tokenizer) of predictions[i] against all of references[i]."""
    _check_pairs(predictions, references)
    width = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference slot; inputs with fewer references pad with None (ignored).
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l_each(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-L F1 × 100 (rouge-score, stemmed) of each prediction against its best-matching reference."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
            for pred, refs in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F1 (rouge-score, stemmed); each prediction takes its best-matching reference."""
    scores = rouge_l_each(predictions, references)
    return sum(scores) / len(scores)


def generation_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu", "rougeL"} on a 0-100 scale."""
    return {"bleu": bleu(predictions, references), "rougeL": rouge_l(predictions, references)}


def _check_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists; give one list per prediction.")
    if not predictions:
        raise ValueError("no predictions to score.")
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ValueError("each input needs a non-empty list of reference strings, e.g. [['ref a', 'ref b'], ['ref c']].")


def bleu_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[int]]:
    """Per input, sacrebleu's sufficient statistics [hyp_len, ref_len, matches 1-4, totals 1-4]: they add up over
    inputs, so corpus BLEU of any subset (a bootstrap resample) is `bleu_from_statistics` of their sum."""
    _check_pairs(predictions, references)
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    metric = sacrebleu.BLEU()
    return [[int(v) for v in row] for row in metric._extract_corpus_statistics(list(predictions), streams)]


def bleu_from_statistics(sums, n: int = 0) -> float:
    """Corpus BLEU (sacrebleu's default exponential smoothing) from summed `bleu_statistics` rows; `n` is unused,
    so this is a `stats.Statistic`."""
    sums = [int(v) for v in sums]
    return float(sacrebleu.BLEU.compute_bleu(sums[2:6], sums[6:10], sums[0], sums[1], smooth_method="exp").score)

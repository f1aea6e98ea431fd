"""Metrics: accuracy, multi-reference BLEU / ROUGE-L against independent computations, reference grouping."""
import pytest
import sacrebleu

from vera_core.lab.metrics import accuracy, bleu, generation_scores, group_references, rouge_l


def test_accuracy_is_a_percentage_and_checks_lengths():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 0, 1], [1, 0])


def test_group_references_collects_every_reference_of_an_input_in_order():
    rows = [{"prompt": "p1", "response": "a", "group": "g1"}, {"prompt": "p2", "response": "b", "group": "g2"},
            {"prompt": "p1", "response": "c", "group": "g1"}, {"prompt": "p3", "response": "d"}]
    assert group_references(rows) == [("p1", ["a", "c"]), ("p2", ["b"]), ("p3", ["d"])]


def test_bleu_scores_against_all_references_of_each_input():
    hyps = ["the cat sat on the red mat today", "a small cafe near the river serves cheap food"]
    refs = [["a dog ran in the park", "the cat sat on the red mat today"],  # the 2nd reference matches
            ["a small cafe near the river serves cheap food"]]  # one reference only: padded for sacrebleu
    assert bleu(hyps, refs) == pytest.approx(100.0)
    only_first = sacrebleu.corpus_bleu(hyps, [[refs[0][0], refs[1][0]]]).score
    assert only_first < 90  # scoring against one reference per input would be much lower


def test_rouge_l_takes_the_best_reference_and_is_0_to_100():
    assert rouge_l(["the cat sat"], [["nothing alike here", "the cat sat"]]) == pytest.approx(100.0)
    # LCS "the cat" of 2 tokens: precision 2/3, recall 2/2 -> F1 0.8
    assert rouge_l(["the cat sat"], [["the cat"]]) == pytest.approx(80.0)
    scores = generation_scores(["the cat sat"], [["the cat"]])
    assert set(scores) == {"bleu", "rougeL"} and 0 <= scores["bleu"] <= 100


def test_scores_refuse_mismatched_or_empty_references():
    with pytest.raises(ValueError, match="one list per prediction"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list of reference strings"):
        rouge_l(["a"], ["a"])

"""Scoring a model as it is: loss (and accuracy) on a split, and the reported test scores with sample outputs.

The trainer calls `evaluate_encoded` for its periodic validation; `evaluate` and `score_split` read whole splits.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .batches import Encoded, batches, encode
from .config import TrainConfig
from .data import TextDataset
from .device import autocast, to_device, use_bf16
from .metrics import bleu_statistics, generation_scores, group_references, rouge_l_each
from .models import generate, predict


@torch.no_grad()
def evaluate_encoded(model: nn.Module, encoded: Encoded, task: str, config: TrainConfig, device: torch.device,
                     bf16: bool, predicted: list | None = None) -> dict:
    """Mean loss per target (response token, or row for classification) and, for classification, accuracy in %.
    `predicted`, when given, receives each row's predicted class, in the split's order."""
    was_training = model.training
    model.eval()
    loss_sum, weight, correct, rows = 0.0, 0, 0, 0
    for i, batch in enumerate(batches(encoded, config.batch_size, shuffle=False, seed=config.seed)):
        if config.eval_batches is not None and i >= config.eval_batches:
            break
        batch = to_device(batch, device)
        with autocast(bf16):
            out = model(**batch)
        labels = batch["labels"]
        if task == "classification":
            n = labels.numel()
            correct += (out.logits.argmax(-1) == labels).sum().item()
            if predicted is not None:
                predicted += out.logits.argmax(-1).tolist()
            rows += n
        else:
            n = (labels[:, 1:] != -100).sum().item()  # the model's loss averages over shifted, unmasked targets
        if n:  # a batch whose responses were all truncated away has no targets (and a NaN loss)
            loss_sum += out.loss.float().item() * n
            weight += n
    model.train(was_training)
    result = {"eval_loss": loss_sum / weight if weight else float("nan")}
    if task == "classification":
        result["eval_accuracy"] = 100.0 * correct / rows if rows else float("nan")
    return result


def evaluate(model: nn.Module, tokenizer, dataset: TextDataset, config: TrainConfig | None = None,
             split: str = "validation", predicted: list | None = None) -> dict:
    """Evaluate the model as it is (e.g. before training) on a whole split: {"eval_loss", ["eval_accuracy"]}.

    `config.eval_batches` caps only the quick validation checks during training, never a score reported here."""
    config = replace(config or TrainConfig(), eval_batches=None)
    device = next(model.parameters()).device
    encoded = encode(getattr(dataset, split), tokenizer, dataset.task, config.max_length)
    return evaluate_encoded(model, encoded, dataset.task, config, device, use_bf16(config.bf16, device), predicted)


def score_split(model, tokenizer, dataset: TextDataset, config: TrainConfig, eval_generate: int = 32,
                n_samples: int = 8, split: str = "test") -> tuple[dict | None, list, list[dict]]:
    """Scores on a split ({"loss", "accuracy"} or {"loss", "bleu", "rougeL"}), the model's outputs for its first
    `n_samples` inputs (class probabilities, or greedy answers), and one row per scored example ({"id" (its position
    in the split, or its group's), "prediction", "score" (1/0 correct, or ROUGE-L), and "bleu_stats" for
    generation}: what intervals are recomputed from. BLEU / ROUGE-L use the first `eval_generate` groups."""
    rows = getattr(dataset, split)
    if not rows:
        return None, [], []
    predicted: list[int] = []
    scores = evaluate(model, tokenizer, dataset, config, split=split, predicted=predicted)
    if dataset.task == "classification":
        texts = [r["text"] for r in rows[:n_samples]]
        probs = predict(model, tokenizer, texts, max_length=config.max_length) if texts else torch.empty(0, 0)
        outputs = [[round(p, 4) for p in row] for row in probs.tolist()]
        examples = [{"id": i, "prediction": p, "score": float(p == int(r["label"]))}
                    for i, (p, r) in enumerate(zip(predicted, rows))]
        return {"loss": scores["eval_loss"], "accuracy": scores["eval_accuracy"]}, outputs, examples
    groups = group_references(rows)[: max(eval_generate, n_samples)]
    answers = generate(model, tokenizer, [p for p, _ in groups], max_new_tokens=config.max_length // 2) if groups else []
    result, examples = {"loss": scores["eval_loss"], "bleu": None, "rougeL": None}, []
    if eval_generate > 0:
        scored = min(eval_generate, len(groups))
        answers_scored, refs = answers[:scored], [refs for _, refs in groups[:scored]]
        result.update(generation_scores(answers_scored, refs))
        per_example = zip(answers_scored, rouge_l_each(answers_scored, refs), bleu_statistics(answers_scored, refs))
        examples = [{"id": i, "prediction": a, "score": rouge, "bleu_stats": stats}
                    for i, (a, rouge, stats) in enumerate(per_example)]
    return result, answers[:n_samples], examples

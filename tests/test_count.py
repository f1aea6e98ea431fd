"""Parameter accounting from configs alone: the paper's Table 1 and the project's reference models."""
import pytest
from helpers import LLAMA_ALL, tiny_bert, tiny_llama
from transformers import BertConfig, LlamaConfig, RobertaConfig

from vera_core import LoraConfig, VeraConfig, add_adapter, count_parameters, estimate_parameters

ROBERTA_BASE = RobertaConfig(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12)
ROBERTA_LARGE = RobertaConfig(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16)
SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152)
MINILM_CONFIG = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)


# vera-method.md, Table 1 (query and value adapted): exact integers of the formulas.
@pytest.mark.parametrize("config,r,lora,vera", [
    (ROBERTA_BASE, 1, 36_864, 18_456), (ROBERTA_BASE, 16, 589_824, 18_816), (ROBERTA_BASE, 256, 9_437_184, 24_576),
    (ROBERTA_LARGE, 1, 98_304, 49_200), (ROBERTA_LARGE, 16, 1_572_864, 49_920),
    (ROBERTA_LARGE, 256, 25_165_824, 61_440),
])
def test_paper_table_1(config, r, lora, vera):
    assert estimate_parameters(config, LoraConfig(r=r))["trainable"] == lora
    v = estimate_parameters(config, VeraConfig(r=r))
    assert v["trainable"] == vera and v["stored_bytes"] == 4 * vera


def test_reference_models():
    assert estimate_parameters(SMOLLM2, VeraConfig(r=256, target_modules=LLAMA_ALL))["trainable"] == 209_280
    assert estimate_parameters(SMOLLM2, LoraConfig(r=8, target_modules=LLAMA_ALL))["trainable"] == 2_442_240
    assert estimate_parameters(MINILM_CONFIG, LoraConfig(r=8))["trainable"] == 73_728
    assert estimate_parameters(MINILM_CONFIG, VeraConfig(r=256))["trainable"] == 7_680
    stored = estimate_parameters(SMOLLM2, VeraConfig(r=256, target_modules=LLAMA_ALL, save_projection=True))
    assert stored["stored_bytes"] == 4 * (209_280 + 256 * (1536 + 1536))


@pytest.mark.parametrize("adapter", [VeraConfig(r=16, target_modules="all-linear"), LoraConfig(r=3, target_modules="all-linear")])
def test_estimate_equals_real_count(adapter):
    model = tiny_llama()
    estimate = estimate_parameters(model.config, adapter)["trainable"]
    assert count_parameters(add_adapter(model, adapter))["trainable"] == estimate


def test_estimate_includes_head_copies():
    model = tiny_bert()
    adapter = VeraConfig(r=8, modules_to_save=["classifier"])
    assert estimate_parameters(model, adapter)["trainable"] == 2 * 2 * (32 + 8) + 32 * 3 + 3
    counts = count_parameters(add_adapter(model, adapter))
    assert counts["trainable"] == counts["trainable_adapter"] + counts["trainable_head"] == 259

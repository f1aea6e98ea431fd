"""VeRA vs LoRA cost for well-known architectures, from their shapes alone (no weights are downloaded)."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import BertConfig, LlamaConfig, PretrainedConfig, RobertaConfig

from ..adapters.config import LoraConfig, VeraConfig
from ..adapters.count import estimate_parameters

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class KnownModel:
    config: PretrainedConfig  # shapes only
    targets: list[str] | None  # the targets this table uses (None: the architecture's query/value default)
    note: str


# Shapes from each model's published config.json.
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
        LLAMA_PROJECTIONS, "all 7 projections"),
    "minilm-l6": KnownModel(
        BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                   vocab_size=30522), None, "query + value"),
    "roberta-base": KnownModel(
        RobertaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        None, "query + value (paper Table 1)"),
    "roberta-large": KnownModel(
        RobertaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        None, "query + value (paper Table 1)"),
    "llama-2-7b": KnownModel(
        LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000), None, "q_proj + v_proj"),
}


def parameter_table(model_config: PretrainedConfig, targets=None, vera_ranks=(256, 1024), lora_ranks=(8, 64),
                    save_projection: bool = False, train_vectors: str = "both") -> list[dict]:
    """One row per (method, r): trainable parameters, fp32 bytes stored, and the ratio to the first LoRA row.
    train_vectors: VeRA's "both", or the ablations' "d" / "b" (one vector per layer)."""
    rows = []
    for r in lora_ranks:
        rows.append({"method": "lora", "r": r, **estimate_parameters(model_config, LoraConfig(r=r, target_modules=targets))})
    for r in vera_ranks:
        vera = VeraConfig(r=r, target_modules=targets, save_projection=save_projection, train_vectors=train_vectors)
        rows.append({"method": "vera", "r": r, **estimate_parameters(model_config, vera)})
    reference = rows[0]["trainable"] if lora_ranks else None
    for row in rows:
        row["lora_ratio"] = reference / row["trainable"] if reference else None
    return rows


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r} for the calculator; known: {', '.join(KNOWN_MODELS)}.")
    return KNOWN_MODELS[name]

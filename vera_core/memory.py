"""Training memory from shapes alone: weights, adapter, gradients + AdamW state, activations — before a run starts.

An estimate, not a measurement: the benchmark reports its error against the peaks the trainer measures.
"""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from .calculator import known_model
from .config import AdapterConfig, LoraConfig, VeraConfig
from .count import estimate_parameters, meta_model
from .inject import resolve_targets
from .layers import layer_shape
from .models import is_causal_lm

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED_BYTES = {"4bit": 0.5, "8bit": 1.0}  # bytes per weight of a quantized Linear (block scales ignored)
ADAM_BYTES = 12  # per trainable fp32 parameter: the gradient plus AdamW's two moments


def _model_and_config(model_config) -> tuple[nn.Module, PretrainedConfig]:
    if isinstance(model_config, str):
        model_config = known_model(model_config).config
    if isinstance(model_config, nn.Module):
        return model_config, model_config.config
    return meta_model(model_config), model_config


def _weight_bytes(model: nn.Module, config: PretrainedConfig, dtype: str, quantization: str | None) -> int:
    """Base weights at `dtype`; with quantization, Linear weights inside the layers at 4 or 8 bits."""
    total = 0.0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            quantized = quantization is not None and isinstance(module, nn.Linear) and name == "weight"
            total += param.numel() * (QUANTIZED_BYTES[quantization] if quantized else DTYPE_BYTES[dtype])
    if is_causal_lm(config) and not getattr(config, "tie_word_embeddings", True):
        total += config.vocab_size * config.hidden_size * DTYPE_BYTES[dtype]  # a separate LM head (AutoModel has none)
    return int(total)


def estimate_memory(model_config, adapter_config: AdapterConfig | str | None, batch_size: int, seq_len: int,
                    dtype: str = "float32", quantization: str | None = None) -> dict[str, int]:
    """Bytes for {"weights", "adapter", "gradients_optimizer", "activations", "total"} of one training step.

    model_config: a transformers config, a model (its shapes are read) or a calculator name ("minilm-l6").
    adapter_config: a VeraConfig / LoraConfig, "full" (every weight trains), "head" (the classifier only), or None
    (inference only).
    Activations follow Korthikanti et al. 2022 (sbh(34 + 5as/h) bytes per layer at 16 bit), plus the adapter's
    r-wide intermediates and, for causal LMs, the logits and their gradient.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {list(DTYPE_BYTES)}, got {dtype!r}.")
    if quantization not in (None, *QUANTIZED_BYTES):
        raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}.")
    model, config = _model_and_config(model_config)
    weights = _weight_bytes(model, config, dtype, quantization)
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    s, b, width = seq_len, batch_size, DTYPE_BYTES[dtype]

    adapter, trainable, adapter_acts = 0, 0, 0
    if isinstance(adapter_config, (VeraConfig, LoraConfig)):
        trainable = estimate_parameters(model, adapter_config)["trainable"]
        adapter = 4 * trainable  # adapter parameters stay fp32 on every base dtype
        shapes = [layer_shape(model.get_submodule(p)) for p in resolve_targets(model, adapter_config)]
        r = adapter_config.r
        if isinstance(adapter_config, VeraConfig):
            adapter += 4 * r * (max(i for i, _ in shapes) + max(o for _, o in shapes))  # the shared A and B
            adapter_acts = len(shapes) * b * s * r * 4 * 2  # A x and d * (A x), kept for backward
        else:
            adapter_acts = len(shapes) * b * s * r * 4  # A x
    elif adapter_config == "full":
        trainable = sum(p.numel() for p in model.parameters())
    elif adapter_config == "head":
        trainable = (h + 1) * getattr(config, "num_labels", 2)  # the classifier Linear
    elif adapter_config is not None:
        raise ValueError(f"adapter_config must be a VeraConfig, LoraConfig, 'full', 'head' or None, got {adapter_config!r}.")

    if adapter_config in (None, "head"):
        # Nothing below the head needs gradients: the forward keeps a few hidden states alive, not the whole graph.
        activations = b * s * h * width * 4
    else:
        per_layer = s * b * h * (34 + 5 * heads * s / h) * width / 2
        activations = int(layers * per_layer) + adapter_acts
    if is_causal_lm(config):
        activations += b * s * config.vocab_size * 4 * (1 if adapter_config in (None, "head") else 2)  # fp32 logits (+ grad)
    gradients_optimizer = ADAM_BYTES * trainable
    out = {"weights": weights, "adapter": adapter, "gradients_optimizer": gradients_optimizer,
           "activations": int(activations)}
    out["total"] = sum(out.values())
    return out


def comparable_estimate(estimate: dict[str, int], peak_memory_kind: str | None) -> int | None:
    """The part of an estimate a measured peak of this kind covers.

    "cuda_max_allocated" is reset when training starts with everything resident: the whole total. "cpu_rss_delta"
    is RSS growth during training, after the model and adapter were built: gradients, optimizer state, activations.
    """
    if peak_memory_kind == "cuda_max_allocated":
        return estimate["total"]
    if peak_memory_kind == "cpu_rss_delta":
        return estimate["gradients_optimizer"] + estimate["activations"]
    return None

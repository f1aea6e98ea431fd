"""Training memory before a run starts: one training step (forward, backward, AdamW step) run on fake tensors,
measured by the same tracker as the trainer (memtrack.py), so prediction and measurement share one definition.

    estimate_memory("smollm2-135m-instruct", VeraConfig(r=256), batch_size=4, seq_len=128)
    # {"weights": ..., "adapter": ..., "gradients": ..., "optimizer": ..., "activations": ..., "temporaries": ...,
    #  "total": ...}  bytes at the step's peak

Fake tensors (`FakeTensorMode`) carry shapes, dtypes and storages but no data: no weight is read, nothing is
computed. bitsandbytes' 4-bit / 8-bit weights cannot be faked: a quantized base runs the step unquantized and counts
its weights as bitsandbytes stores them. Where a model's forward cannot run on fake tensors (data-dependent code), a
closed-form formula stands in, with a warning that names the reason.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from ..adapters.checks import positive_int
from ..adapters.config import AdapterConfig, LoraConfig, VeraConfig
from ..adapters.count import estimate_parameters, meta_model
from ..adapters.fused import fast_path_enabled, fast_vera, keep_saving
from ..adapters.inject import resolve_targets
from ..adapters.layers import layer_shape
from .config import fold_policy
from .memtrack import MemoryTracker, extent_bytes
from .models import enable_grad_checkpointing, is_causal_lm, make_trainable, model_config as config_of

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED_BYTES = {"4bit": 0.5, "8bit": 1.0}  # bytes per weight of a quantized Linear (block scales ignored)
ADAM_BYTES = 8  # per trainable fp32 parameter: AdamW's two moments (the gradient is 4 more)


def _model_and_config(model_config) -> tuple[nn.Module | None, PretrainedConfig]:
    """(the given model or None, its config) for a model, a transformers config or a model name."""
    if isinstance(model_config, str):
        return None, config_of(model_config)
    if isinstance(model_config, nn.Module):
        return model_config, model_config.config
    return None, model_config


def _fake_model(model: nn.Module | None, config: PretrainedConfig, dtype: str) -> nn.Module:
    """The architecture with fake weights: the given model's own class, else the Auto class of its task (a causal
    LM, or a sequence classifier). Call inside FakeTensorMode."""
    config = copy.deepcopy(config)
    if model is not None:
        return type(model)._from_config(config, dtype=getattr(torch, dtype))
    if is_causal_lm(config):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # sequence classifiers find each row's last token through it
    return AutoModelForSequenceClassification.from_config(config, dtype=getattr(torch, dtype))


def _fake_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A fixed-length batch: token ids and labels. No attention mask: on a batch without padding the trainer's mask
    is all ones, which transformers sees (a data-dependent check that fake tensors cannot make) and then builds no
    mask; without one, the fake step takes that same path."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)  # (B, T)
    causal = model.get_output_embeddings() is not None  # a classifier has no output embedding
    labels = ids.clone() if causal else torch.zeros(batch_size, dtype=torch.long)  # (B, T) or (B,)
    return {"input_ids": ids, "labels": labels}


def _tracked_step(model: nn.Module, batch: dict, max_grad_norm: float | None) -> MemoryTracker:
    """One training step as the trainer runs it (forward, backward, clipping, AdamW step, zero_grad), tracked;
    a model with nothing trainable runs one forward without gradients instead. AdamW's state is made first: every
    step after the first holds it through forward and backward, so that step is the one with the run's peak."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params) if params else None
    if optimizer is not None:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tracker = MemoryTracker(model, optimizer)
    model.train(bool(params))
    with tracker:
        if not params:
            with torch.no_grad():
                model(**batch)
            return tracker
        loss = model(**batch).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tracker


class _KeepInput(torch.autograd.Function):
    """Identity on a layer's output that holds the layer's input until backward, outside save_for_backward, as
    bitsandbytes' 8-bit matmul does (`ctx.A = A` on CPU, `ctx.tensors` on CUDA): the tracker counts it as a
    temporary, as it does for the real layer, and only while the output is part of the graph."""

    @staticmethod
    def forward(ctx, out, x):
        ctx.x = x
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _as_quantized(model: nn.Module, quantization: str) -> None:
    """Make the unquantized fake model's frozen Linears (the ones bitsandbytes replaces; the output embedding stays)
    behave as bitsandbytes' do for memory: never folded by VeRA (a bitsandbytes layer is not a plain Linear; any
    forward hook keeps VeraLayer from folding too), and at 8 bits holding their input for backward."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if type(module) is nn.Linear and module is not head and not module.weight.requires_grad:
            if quantization == "8bit":
                module.register_forward_hook(lambda _, inputs, out: _KeepInput.apply(out, inputs[0]))
            else:
                module.register_forward_hook(lambda *_: None)


def fake_step_estimate(model: nn.Module | None, config: PretrainedConfig, adapter_config: AdapterConfig | str | None,
                       batch_size: int, seq_len: int, dtype: str = "float32", grad_checkpointing: bool = False,
                       max_grad_norm: float | None = 1.0, quantization: str | None = None) -> dict[str, int]:
    """The tracker's breakdown of one training step on fake tensors (see estimate_memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # private to torch, so imported where it is used

    method = adapter_config if not isinstance(adapter_config, (VeraConfig, LoraConfig)) else adapter_config.method
    adapter = adapter_config if isinstance(adapter_config, (VeraConfig, LoraConfig)) else None
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        # deepcopy (a head copied into modules_to_save) asks each fake tensor for its data pointer, finds none (0) and
        # clones it; ModulesToSave.add keeps the copy in this one mode
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        fake = make_trainable(_fake_model(model, config, dtype), method or "base", adapter)
        if quantization is not None:
            _as_quantized(fake, quantization)
        if grad_checkpointing:
            enable_grad_checkpointing(fake)
        batch = _fake_batch(fake, batch_size, seq_len)
        return _tracked_step(fake, batch, max_grad_norm).breakdown()


def _quantized_estimate(model: nn.Module | None, config: PretrainedConfig, adapter_config, batch_size: int,
                        seq_len: int, dtype: str, quantization: str, grad_checkpointing: bool,
                        max_grad_norm: float | None) -> dict[str, int]:
    """A 4-bit / 8-bit base: bitsandbytes weights cannot run on fake tensors, so the fake step runs the same
    architecture unquantized at the compute dtype, its Linears made to keep what bitsandbytes' keep (`_as_quantized`),
    and its weights are then counted as bitsandbytes stores them: the loaded model's own parameter and buffer bytes,
    else 4 or 8 bits per Linear weight inside the layers."""
    plain = copy.deepcopy(config)
    plain.__dict__.pop("quantization_config", None)
    parts = fake_step_estimate(model, plain, adapter_config, batch_size, seq_len, dtype, grad_checkpointing,
                               max_grad_norm, quantization)
    if model is not None:
        storages = {torch._C._storage_id(t): extent_bytes(t) for t in (*model.parameters(), *model.buffers())}
        weights = sum(storages.values())
    else:
        weights = _weight_bytes(meta_model(config), config, dtype, quantization)
    parts["total"] += weights - parts["weights"]
    parts["weights"] = weights
    return parts


def estimate_memory(model_config, adapter_config: AdapterConfig | str | None, batch_size: int, seq_len: int,
                    dtype: str = "float32", quantization: str | None = None, *, grad_checkpointing: bool = False,
                    max_grad_norm: float | None = 1.0, prefer: str | None = None) -> dict[str, int]:
    """Bytes at the peak of one training step: {"weights", "adapter", "gradients", "optimizer", "activations",
    "temporaries", "total"}, the trainer's `memory_breakdown` categories, on fixed-length (B, T) batches.

    model_config: a transformers config, a model (only its class and config are used) or a model name.
    adapter_config: a VeraConfig / LoraConfig, "full" (every weight trains), "head" (the classifier only), or None
    (inference: one forward without gradients). Quantized bases (bitsandbytes cannot run on fake tensors) run the
    fake step unquantized and count their weights as bitsandbytes stores them; a model whose forward fails on fake
    tensors falls back to the closed-form formula, with a warning naming the reason. prefer: "memory" or "speed",
    what VeRA does with its folded weights (TrainConfig.prefer); None: the library's current policy (`fast_vera`).
    The batch is an upper bound on real ones: every row at `seq_len` (real batches pad to their longest row).
    """
    if prefer is not None:
        with fold_policy(prefer):
            return estimate_memory(model_config, adapter_config, batch_size, seq_len, dtype, quantization,
                                   grad_checkpointing=grad_checkpointing, max_grad_norm=max_grad_norm)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {list(DTYPE_BYTES)}, got {dtype!r}.")
    if quantization not in (None, *QUANTIZED_BYTES):
        raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}.")
    if not isinstance(adapter_config, (VeraConfig, LoraConfig)) and adapter_config not in ("full", "head", None):
        raise ValueError(f"adapter_config must be a VeraConfig, LoraConfig, 'full', 'head' or None, got {adapter_config!r}.")
    model, config = _model_and_config(model_config)
    try:
        if quantization is None:
            return fake_step_estimate(model, config, adapter_config, batch_size, seq_len, dtype, grad_checkpointing,
                                      max_grad_norm)
        return _quantized_estimate(model, config, adapter_config, batch_size, seq_len, dtype, quantization,
                                   grad_checkpointing, max_grad_norm)
    except Exception as err:  # noqa: BLE001 - any failure of the fake step means: use the formula instead
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    warnings.warn(f"estimate_memory used the closed-form formula instead of a fake training step ({reason}); "
                  "its error is larger (see benchmarks/results/memory.md).", stacklevel=2)
    return formula_estimate(model if model is not None else meta_model(config), config, adapter_config, batch_size,
                            seq_len, dtype, quantization)


def fold_estimates(model_config, adapter_config: AdapterConfig | str | None, batch_size: int, seq_len: int,
                   dtype: str = "float32", quantization: str | None = None, *, grad_checkpointing: bool = False,
                   max_grad_norm: float | None = 1.0) -> dict | None:
    """What VeRA's two ways with its folded weights W' cost: {"keep": peak bytes keeping them for backward,
    "rebuild": peak bytes rebuilding them there (one fake step each), "keep_saving": the share of the adapted layers'
    step time keeping saves, by the cost model in adapters/fused.py (negative: keeping is slower)}. None when the
    adapter is not VeRA."""
    if not isinstance(adapter_config, VeraConfig):
        return None
    out = {}
    for policy in ("keep", "rebuild"):
        with fast_vera(fast_path_enabled(), policy):
            out[policy] = estimate_memory(model_config, adapter_config, batch_size, seq_len, dtype, quantization,
                                          grad_checkpointing=grad_checkpointing, max_grad_norm=max_grad_norm)["total"]
    model, config = _model_and_config(model_config)
    model = model if model is not None else meta_model(config)
    tokens, saved, step = batch_size * seq_len, 0, 0
    for path in resolve_targets(model, adapter_config):
        n_in, n_out = layer_shape(model.get_submodule(path))
        if tokens * (n_in + n_out) > n_in * n_out:  # the layers that fold (VeraLayer._foldable)
            layer_saved, layer_step = keep_saving(tokens, n_in, n_out, adapter_config.r)
            saved, step = saved + layer_saved, step + layer_step
    out["keep_saving"] = saved / step if step else 0.0
    return out


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


def formula_estimate(model: nn.Module, config: PretrainedConfig, adapter_config: AdapterConfig | str | None,
                     batch_size: int, seq_len: int, dtype: str, quantization: str | None) -> dict[str, int]:
    """The fallback when a step cannot run on fake tensors: the same categories from closed-form counts.

    Activations follow Korthikanti et al. 2022 (sbh(34 + 5as/h) bytes per layer at 16 bit), plus the adapter's
    r-wide intermediates and, for causal LMs, the logits and their gradient; temporaries are not modelled (0).
    """
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

    if adapter_config in (None, "head"):
        # Nothing below the head needs gradients: the forward keeps a few hidden states alive, not the whole graph.
        activations = b * s * h * width * 4
    else:
        per_layer = s * b * h * (34 + 5 * heads * s / h) * width / 2
        activations = int(layers * per_layer) + adapter_acts
    if is_causal_lm(config):
        activations += b * s * config.vocab_size * 4 * (1 if adapter_config in (None, "head") else 2)  # fp32 logits (+ grad)
    out = {"weights": weights, "adapter": adapter, "gradients": 4 * trainable, "optimizer": ADAM_BYTES * trainable,
           "activations": int(activations), "temporaries": 0}
    out["total"] = sum(out.values())
    return out


def comparable_estimate(estimate: dict[str, int], peak_memory_kind: str | None) -> int | None:
    """The part of an estimate a measured peak of this kind covers: all of it for the tracker's "tensors" (both
    count the same live storages), nothing for a kind it cannot be compared with."""
    return estimate["total"] if peak_memory_kind == "tensors" else None


@dataclass(frozen=True)
class Fit:
    """The answer to "will it fit?" for one configuration: the largest batch whose predicted peak fits the budget."""

    batch_size: int  # 0 when not even one row fits
    budget_bytes: int
    seq_len: int
    fixed_bytes: int  # the line peak = fixed + per_row * batch, from two fake steps
    per_row_bytes: int
    breakdown: dict[str, int]  # the checked fake step's breakdown at batch_size (at 1 when nothing fits)
    fake_steps: int  # how many fake steps the answer took (the third one checks the line's answer)

    @property
    def message(self) -> str:
        need = _size(self.breakdown["total"])
        if self.batch_size == 0:
            return (f"does not fit: one sequence of {self.seq_len} tokens needs {need}, more than the "
                    f"{_size(self.budget_bytes)} budget; try a shorter sequence, a smaller r or a 4-bit base")
        return f"batch {self.batch_size:,} of {self.seq_len} tokens fits: {need} predicted"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


def largest_batch(model_config, adapter_config: AdapterConfig | str | None, budget_bytes: int, seq_len: int,
                  dtype: str = "float32", quantization: str | None = None, *, grad_checkpointing: bool = False,
                  max_batch: int = 65536, prefer: str | None = None) -> Fit:
    """The largest training batch of `seq_len`-token sequences whose predicted peak (`estimate_memory`) is within
    `budget_bytes`. The peak is close to linear in the batch: fake steps at 1 and 8 rows give the line, a third
    checks its answer, and while the check is over budget the line is redrawn through it (a secant step)."""
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}.")
    positive_int("seq_len", seq_len)

    def estimate(batch: int) -> dict[str, int]:
        return estimate_memory(model_config, adapter_config, batch, seq_len, dtype, quantization,
                               grad_checkpointing=grad_checkpointing, prefer=prefer)

    points = {1: estimate(1)}
    if points[1]["total"] > budget_bytes:
        return Fit(0, budget_bytes, seq_len, points[1]["total"], 0, points[1], 1)
    points[8] = estimate(8)
    low, high = 1, 8  # the two batches the line goes through
    while True:
        per_row = max(1, (points[high]["total"] - points[low]["total"]) // (high - low))
        fixed = points[low]["total"] - per_row * low
        batch = max(1, min(max_batch, (budget_bytes - fixed) // per_row))
        if batch not in points:
            points[batch] = estimate(batch)
        if points[batch]["total"] <= budget_bytes or batch == 1 or len(points) >= 6:
            break
        low, high = max(b for b in points if b < batch), batch
    fits = [b for b, parts in points.items() if parts["total"] <= budget_bytes]
    best = max(fits)
    return Fit(best, budget_bytes, seq_len, fixed, per_row, points[best], len(points))

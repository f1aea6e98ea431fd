"""Adapter layers. Each wraps a frozen layer, kept as `base_layer`, and adds a low-rank update beside it.

    VeRA:  h = W0 x + Λ_b B_s Λ_d A_s x       Λ_b = diag(b), Λ_d = diag(d) trained per layer;
                                              A_s = A[:, :in], B_s = B[:out, :] slices of one shared, frozen pair
    LoRA:  h = W0 x + (alpha / r) B A x       A, B trained per layer

The paper's ablations (VeraConfig) keep this formula: an omitted b or d is a frozen constant, and with
projections="unique" A_s, B_s are the layer's own pair.

Several named adapters can live on one layer; exactly one (or none) is active, or, for a mixed batch, each row
names its own (`rows`, set by mixed.py, which also computes those rows). The folded VeRA path is in fused.py.
"""
from __future__ import annotations

import copy
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import fused
from .config import LoraConfig, VeraConfig
from .projections import VeraProjections


def is_quantized(module: nn.Module) -> bool:
    """bitsandbytes Linear4bit / Linear8bitLt (both subclass nn.Linear, so type names are checked, not isinstance)."""
    return type(module).__module__.startswith("bitsandbytes")


def keep_portable_4bit(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes 4-bit weight in its portable layout. On CPUs with AVX512-BF16, bitsandbytes 0.50.2
    repacks a Linear4bit's weight in place on its first eval forward without gradients; the repacked layout fails on
    small layers ("shape '[32, 0]' is invalid") and breaks training afterwards ("a view of a leaf Variable ...")."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a bitsandbytes linear, or a GPT-2 Conv1D (weight stored in x out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(
        f"{type(module).__name__} is not supported as an adapter target; supported: nn.Linear, transformers Conv1D, "
        "bitsandbytes Linear4bit / Linear8bitLt."
    )


class AdapterLayer(nn.Module):
    """What VeRA and LoRA layers share: the frozen `base_layer`, the active adapter, dropout, merge / unmerge."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        self.adapter_names: list[str] = []  # in the order added (VeRA's stacked vectors use it)
        # Only adapters trained with dropout get a module: a module per adapter and layer would make loading many
        # adapters, and every walk over the model, grow with their number.
        self.dropout = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.rows = None  # a mixed.RowAdapters, set only for the duration of a mixed-batch call

    def _register(self, name: str, dropout: float) -> None:
        self.adapter_names.append(name)
        if dropout > 0:
            self.dropout[name] = nn.Dropout(dropout)

    def route(self, x: torch.Tensor):
        """(the adapter every row uses or None, None), or (None, rows) when rows use different adapters. A mixed call
        whose rows all name one adapter takes the one-adapter path (VeRA's fold included): exact for every row."""
        rows = self.rows
        if rows is None:
            return self.active_adapter, None
        rows.check_batch(x)
        if rows.single is None:
            return None, rows
        return (rows.single if rows.single in self.adapter_names else None), None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name, rows = self.route(x)
        if rows is not None:
            return rows.per_adapter(self, x, result)  # one sub-batch per distinct adapter (mixed.py)
        if name is None or self.merged_adapter is not None:
            return result
        x = self.dropout[name](x) if name in self.dropout else x
        return result + self.adapter_output(x, name).to(result.dtype)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The tensors adapter `name` trains in this layer: training, counting, activation and saving ask here."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update as a dense (out, in) matrix, in fp32."""
        raise NotImplementedError

    def _apply_delta(self, name: str, sign: float) -> None:
        if is_quantized(self.base_layer):
            raise NotImplementedError(
                "merging into a 4-bit / 8-bit base is refused: re-quantizing the merged weight would lose the adapter's "
                "small update. Load the base in fp32/bf16, load the adapter, then merge."
            )
        weight = self.base_layer.weight
        delta = self.delta_weight(name).to(weight.device)
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        with torch.no_grad():
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        """Add the active adapter's update into the base weight (exact up to float rounding)."""
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        self._apply_delta(self.active_adapter, +1.0)  # raises before any state changes on a quantized base
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        self._apply_delta(self.merged_adapter, -1.0)
        self.merged_adapter = None

    def _param_device(self) -> torch.device:
        # Every supported layer has a weight; reading it, not walking parameters(), keeps adding many adapters cheap.
        return self.base_layer.weight.device


class VeraLayer(AdapterLayer):
    """VeRA on one layer: trainable b (out) and d (r) around the model's shared frozen (A, B) (or, with
    projections="unique", a pair of its own)."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections):
        super().__init__(base_layer)
        self.projections = projections  # the same module object in every VeraLayer of the model
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.bank = None  # mixed.VectorBank: every adapter's b and d stacked for mixed batches (not in state dict)
        self.trains: dict[str, str] = {}  # adapter name -> its config's train_vectors ("both", "d" or "b")

    def add(self, name: str, config: VeraConfig) -> None:
        device = self._param_device()
        # b = 0 keeps the model unchanged at step 0; d = d_init (a small constant, per the paper's ablation).
        # Frozen until set_active_adapter trains them (as for LoRA below): adding many needs no second pass.
        # A vector the config omits (train_vectors "d" or "b") is held as a frozen constant — b = 1, or d = 1 by
        # d_init — never trained, counted or saved, so every path (fold, mixed rows, merge) reads one formula.
        b_init = 0.0 if config.train_vectors in ("both", "b") else 1.0
        self.vera_lambda_b[name] = nn.Parameter(torch.full((self.out_features,), b_init, device=device),
                                                requires_grad=False)
        self.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), float(config.d_init), device=device),
                                                requires_grad=False)
        self.trains[name] = config.train_vectors
        self._register(name, config.dropout)

    @property
    def slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_s, B_s) = (A[:, :in], B[:out, :]): this layer's corner of the shared pair, (r, in) and (out, r)."""
        return self.projections.A[:, : self.in_features], self.projections.B[: self.out_features, :]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """h = W0 x + Λ_b B_s Λ_d A_s x for the active adapter (Λ_b = diag(b), Λ_d = diag(d)), or each row's own."""
        name, rows = self.route(x)
        if rows is None and not (args or kwargs) and fused.foldable(self, x, name):
            return fused.folded_forward(self, x, name)  # the same h through W0 + Λ_b B_s Λ_d A_s, formed once
        h = self.base_layer(x, *args, **kwargs)  # W0 x: (..., out)
        if rows is not None:
            return rows.vera(self, x, h)  # each row with its own b and d, gathered (mixed.py)
        if name is None or self.merged_adapter is not None:
            return h  # no adapter here, or it is already inside W0
        x = self.dropout[name](x) if name in self.dropout else x
        return h + self.adapter_output(x, name).to(h.dtype)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Λ_b B_s Λ_d A_s x. The fast path computes A_s x once for all layers that read the same x (fused.py);
        off (fast_vera(False)), the formula as written: the reference the fast path is tested against."""
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]  # (out,), (r,)
        A_s, B_s = self.slices  # (r, in), (out, r)
        if fused.fast_path_enabled():
            u = self.projections.project_input(x, self.in_features, b.dtype)  # A_s x: (..., r)
        else:
            u = F.linear(x.to(b.dtype), A_s)  # A_s x: (..., r)
        return b * F.linear(d * u, B_s)  # (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        b, d = self.vera_lambda_b[name].float(), self.vera_lambda_d[name].float()
        A_s, B_s = (t.float() for t in self.slices)
        return (b[:, None] * B_s) @ (d[:, None] * A_s)  # (out, in)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        trains = self.trains[name]  # an omitted vector is a frozen constant, not the adapter's
        return [v[name] for v, kind in ((self.vera_lambda_b, "b"), (self.vera_lambda_d, "d"))
                if trains in ("both", kind)]


class LoraLayer(AdapterLayer):
    """LoRA on one layer: trainable A (r, in) and B (out, r), update scaled by alpha / r."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, config: LoraConfig) -> None:
        device = self._param_device()
        A = torch.empty(config.r, self.in_features, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as PEFT (and nn.Linear's default init)
        self.lora_A[name] = nn.Parameter(A, requires_grad=False)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, config.r, device=device),  # B = 0: no change
                                         requires_grad=False)
        self.scaling[name] = config.scaling
        self._register(name, config.dropout)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        return F.linear(F.linear(x.to(A.dtype), A), B) * self.scaling[name]  # (..., r) -> (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_B[name]]


class ModulesToSave(nn.Module):
    """A module trained as full copies (one per adapter) while the original stays untouched, as PEFT does."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.rows = None  # a mixed.RowAdapters, set only for the duration of a mixed-batch call

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, name: str) -> None:
        # deepcopy copies each tensor's own attributes too, and a fake tensor's (estimate_memory builds the head under
        # FakeTensorMode) include its mode: the memo shares that one mode, because a copy living in a second mode
        # that the first converts as if it were real corrupts the heap.
        modes = (getattr(t, "fake_mode", None) for t in [*self.original_module.parameters(),
                                                          *self.original_module.buffers()])
        memo = {id(mode): mode for mode in modes if mode is not None}
        self.modules_to_save[name] = copy.deepcopy(self.original_module, memo)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The head copy's tensors that adapter `name` trains."""
        return list(self.modules_to_save[name].parameters())

    def forward(self, *args, **kwargs):
        if self.rows is None:
            return self.module_for(self.active_adapter)(*args, **kwargs)
        self.rows.check_batch(args[0])
        if self.rows.single is not None:  # every row one adapter: its copy for the whole batch
            return self.module_for(self.rows.single)(*args, **kwargs)
        return self.rows.per_head(self, *args, **kwargs)  # one sub-batch per distinct adapter (mixed.py)

    def module_for(self, name: str | None) -> nn.Module:
        """Adapter `name`'s copy, or the original for None and names without a copy."""
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module


def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) in named_modules() order, adapter wrappers included but not the modules inside them: every
    adapter adds modules to each wrapper (its dropout), so with many adapters a full walk grows with their number,
    and no verb needs what a wrapper holds."""
    seen, stack = set(), [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if not isinstance(module, (AdapterLayer, ModulesToSave)):
            prefix = f"{path}." if path else ""
            stack += [(prefix + n, c) for n, c in reversed(module._modules.items()) if c is not None]

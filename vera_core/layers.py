"""Adapter layers. Each wraps a frozen layer, kept as `base_layer`, and adds a low-rank update beside it.

    VeRA:  h = base(x) + b * (B_s (d * (A_s x)))      A_s = A[:, :in], B_s = B[:out, :]  (shared, frozen)
    LoRA:  h = base(x) + (alpha / r) * B (A x)         A, B trained per layer

Several named adapters can live on one layer; exactly one (or none) is active.
"""
from __future__ import annotations

import copy
import math

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
        self.dropout = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.dropout.keys())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return result
        return result + self.adapter_output(self.dropout[name](x), name).to(result.dtype)

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
        return next(self.base_layer.parameters()).device


class VeraLayer(AdapterLayer):
    """VeRA on one layer: trainable b (out) and d (r) around the model's shared frozen (A, B)."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections):
        super().__init__(base_layer)
        self.projections = projections  # the same module object in every VeraLayer of the model
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()

    def add(self, name: str, config: VeraConfig) -> None:
        device = self._param_device()
        # b = 0 keeps the model unchanged at step 0; d = d_init (a small constant, per the paper's ablation).
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), float(config.d_init), device=device))
        self.dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if name is None or self.merged_adapter is not None or args or kwargs or not self._foldable(x, name):
            return super().forward(x, *args, **kwargs)
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if isinstance(self.base_layer, Conv1D):
            weight = weight.T  # Conv1D stores (in, out)
        A_s = self.projections.A[:, : self.in_features]  # (r, in)
        B_s = self.projections.B[: self.out_features, :]  # (out, r)
        u = None
        if torch.is_grad_enabled() and (b.requires_grad or d.requires_grad):
            u = self.projections.project_input(x, self.in_features, b.dtype).detach()  # (..., r), shared
        keep = fused.keep_folded(x.numel() // self.in_features, self.in_features, self.out_features)
        return fused.FoldedVera.apply(x, weight, bias, b, d, A_s, B_s, u, keep)

    def _foldable(self, x: torch.Tensor, name: str) -> bool:
        """Fold the update into the frozen weight when that is exact (fp32 without autocast, frozen plain Linear /
        Conv1D, no active dropout, no hooks on the base) and cheaper: N·(in + out) > in·out for N tokens (fused.py).
        Under bf16 autocast a folded W' would round the small update into W0's bf16 values, so it is not folded."""
        base, dropout = self.base_layer, self.dropout[name]
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        fp32 = base.weight.dtype == x.dtype == self.vera_lambda_b[name].dtype == self.projections.A.dtype == torch.float32
        tokens = x.numel() // self.in_features
        return (fused.fast_path_enabled() and type(base) in (nn.Linear, Conv1D) and frozen and fp32
                and not torch.is_autocast_enabled(x.device.type)
                and not (base._forward_hooks or base._forward_pre_hooks)
                and (isinstance(dropout, nn.Identity) or not dropout.training)
                and tokens * (self.in_features + self.out_features) > self.in_features * self.out_features)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """b * (B_s (d * (A_s x))) with A_s x shared between layers that read the same input (fused.py)."""
        if not fused.fast_path_enabled():
            return self.plain_adapter_output(x, name)
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        u = self.projections.project_input(x, self.in_features, b.dtype)  # (..., r)
        return b * F.linear(d * u, self.projections.B[: self.out_features, :])  # (..., out)

    def plain_adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The formula as written, nothing shared or folded: the reference the fast path is tested against."""
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        A = self.projections.A[:, : self.in_features]  # (r, in)
        B = self.projections.B[: self.out_features, :]  # (out, r)
        h = F.linear(x.to(b.dtype), A)  # (..., r)
        return b * F.linear(d * h, B)  # (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        b, d = self.vera_lambda_b[name].float(), self.vera_lambda_d[name].float()
        A = self.projections.A[:, : self.in_features].float()
        B = self.projections.B[: self.out_features, :].float()
        return (b[:, None] * B) @ (d[:, None] * A)  # (out, in)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.vera_lambda_b[name], self.vera_lambda_d[name]]


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
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, config.r, device=device))  # B = 0: no change at step 0
        self.scaling[name] = config.scaling
        self.dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

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

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The head copy's tensors that adapter `name` trains."""
        return list(self.modules_to_save[name].parameters())

    def forward(self, *args, **kwargs):
        name = self.active_adapter
        module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
        return module(*args, **kwargs)

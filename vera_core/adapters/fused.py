"""The fast VeRA path: shared input projections and the folded update. Exact: same formula, less arithmetic.

Two savings, both chosen per call for each `VeraLayer` (layers.py) forward:

1. Shared input projection. q, k, v (and gate, up) read the same tensor x and, having the same in_features, the
   same slice A_s = A[:, :in]. u = x A_sᵀ is computed once per input and reused; because u is then one autograd
   node feeding several layers, autograd sums their gradients first and does a single g_u A_s in backward.
   With VeraConfig(projections="unique") every layer holds its own pair and cache: nothing is shared across layers.

2. Folded update. With N tokens, the per-token path costs 4·N·r·(in + out) FLOPs (forward + backward) and keeps an
   (N, out) activation for b's gradient. Forming W' = W0 + (b ⊙ B_s)(d ⊙ A_s) once costs 2·out·r·in, after which
   the forward and the input gradient are the frozen layer's own products; b's and d's gradients come from one
   (out, r) product P = gᵀu. It wins when N·(in + out) > in·out (for SmolLM2 at 512 tokens: every projection).

   Backward needs W' for the input gradient. Keeping it holds an (out, in) tensor per layer until backward (as much
   memory as a copy of the adapted weights); rebuilding it keeps only u and costs the 2·out·r·in product once more.
   The default rebuilds (memory first: a kept W' is a weight-sized copy per layer, for SmolLM2-135M at 4 × 128 with
   r=256 +403 MiB, VeRA 1.20× LoRA r=8's peak instead of 0.91×). That costs time where the product is a large share
   of the step: rebuilding measured 12.5% slower a step there (benchmarks/results/speed.md, 2026-12-05, idle
   2-core CPU), and nothing at 4 × 512. "keep" is the fastest (the lab's prefer="speed"); "auto" keeps W' only where
   rebuilding would cost at least KEEP_MIN_SHARE of the layer's step by a FLOP count: rebuilding adds 2·out·r·in to
   a step of 4·N·in·out (forward and input gradient) + 4·out·r·in (two folds) + 2·N·r·(in + out) (u and P); at
   4 × 128, r=256 the count gives 13% of the adapted layers' work, close to the measured 12.5%.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

FOLDED_BACKWARD = ("rebuild", "keep", "auto")  # the first is the default
_fast_path = True
_folded_backward = "rebuild"


def fast_path_enabled() -> bool:
    return _fast_path


KEEP_MIN_SHARE = 0.15  # "auto" keeps W' only where rebuilding it would cost at least this share of the layer's step


def keep_saving(tokens: int, in_features: int, out_features: int, r: int) -> tuple[int, int]:
    """(FLOPs that keeping W' saves over rebuilding it, FLOPs of the layer's step when rebuilding), by the count in
    the module docstring."""
    saved = 2 * r * in_features * out_features  # rebuild's extra product
    step = 4 * (tokens + r) * in_features * out_features + 2 * tokens * r * (in_features + out_features)
    return saved, step


def keep_folded(tokens: int, in_features: int, out_features: int, r: int) -> bool:
    """Whether a folded layer keeps W' for backward (True) or rebuilds it there (False); see the module docstring."""
    if _folded_backward != "auto":
        return _folded_backward == "keep"
    saved, step = keep_saving(tokens, in_features, out_features, r)
    return saved >= KEEP_MIN_SHARE * step


@contextmanager
def fast_vera(enabled: bool = True, folded_backward: str = "rebuild") -> Iterator[None]:
    """Inside the block: the fast path on or off (off: the plain formula, for references and benchmarks), and
    whether folded layers keep W' for backward ("keep": fastest), rebuild it ("rebuild": least memory, the default) or
    keep it only where rebuilding would cost a real share of the step ("auto"; see the module docstring)."""
    global _fast_path, _folded_backward
    if folded_backward not in FOLDED_BACKWARD:
        raise ValueError(f"folded_backward={folded_backward!r}: use one of {', '.join(FOLDED_BACKWARD)}.")
    previous = _fast_path, _folded_backward
    _fast_path, _folded_backward = enabled, folded_backward
    try:
        yield
    finally:
        _fast_path, _folded_backward = previous


class InputProjectionCache:
    """u = x A_sᵀ for the last input seen: one slot, so at most one (N, r) tensor is held.

    A hit needs the very same tensor object (a weakref, never an id that a new tensor could reuse), an unchanged
    version counter (no in-place edit since), the same slice, cast dtype, projection tensor and grad mode. The slot
    is dropped as soon as x is freed. Inference tensors (generate runs under inference_mode) carry no version
    counter, so the slot keeps a copy of x and a hit also needs torch.equal with it: reading x twice costs 1/r of the
    product it saves, which q, k, v (and gate, up) would otherwise each recompute at every decode step.
    """

    def __init__(self):
        self._clear()

    def __reduce__(self):  # deepcopy / pickle give an empty cache (weakrefs cannot be copied)
        return (InputProjectionCache, ())

    def _clear(self, ref: weakref.ref | None = None) -> None:
        if ref is None or ref is getattr(self, "_ref", None):
            self._ref = self._key = self._A = self._u = self._copy = None

    def project(self, x: torch.Tensor, A: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        """F.linear(x.to(dtype), A[:, :in_features]) of shape (..., r), computed once per input and slice."""
        inference = x.is_inference()
        key = (None if inference else x._version, in_features, dtype, torch.is_grad_enabled(), A._version)
        if (self._ref is not None and self._ref() is x and self._A is A and self._key == key
                and (not inference or torch.equal(x, self._copy))):
            return self._u
        u = F.linear(x.to(dtype), A[:, :in_features])  # (..., r)
        self._ref, self._key, self._A, self._u = weakref.ref(x, self._clear), key, A, u
        self._copy = x.clone() if inference else None
        return u


def foldable(layer: nn.Module, x: torch.Tensor, name: str | None) -> bool:
    """Whether a VeraLayer's forward folds adapter `name` into its frozen weight: only where that is exact (fp32
    without autocast, a frozen plain Linear / Conv1D, no active dropout, no hooks on the base, not merged) and
    cheaper: N·(in + out) > in·out for N tokens. Under bf16 autocast a folded W' would round the small update into
    W0's bf16 values."""
    if name is None or layer.merged_adapter is not None:
        return False
    base, in_f, out_f = layer.base_layer, layer.in_features, layer.out_features
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    fp32 = base.weight.dtype == x.dtype == layer.vera_lambda_b[name].dtype == layer.projections.A.dtype == torch.float32
    tokens = x.numel() // in_f
    return (fast_path_enabled() and type(base) in (nn.Linear, Conv1D) and frozen and fp32
            and not torch.is_autocast_enabled(x.device.type)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and (name not in layer.dropout or not layer.dropout[name].training)
            and tokens * (in_f + out_f) > in_f * out_f)


def folded_forward(layer: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """A VeraLayer's h = x W'ᵀ + bias with W' = W0 + Λ_b B_s Λ_d A_s (when `foldable`): (..., in) -> (..., out)."""
    b, d = layer.vera_lambda_b[name], layer.vera_lambda_d[name]
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    if isinstance(layer.base_layer, Conv1D):
        weight = weight.T  # Conv1D stores (in, out)
    A_s, B_s = layer.slices
    u = None
    if torch.is_grad_enabled() and (b.requires_grad or d.requires_grad):
        u = layer.projections.project_input(x, layer.in_features, b.dtype).detach()  # (..., r), shared
    keep = keep_folded(x.numel() // layer.in_features, layer.in_features, layer.out_features, A_s.shape[0])
    return FoldedVera.apply(x, weight, bias, b, d, A_s, B_s, u, keep)


def fold(weight: torch.Tensor, b: torch.Tensor, d: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor) -> torch.Tensor:
    """W' = W0 + diag(b) B_s diag(d) A_s, shape (out, in)."""
    return torch.addmm(weight, B_s * b[:, None], A_s * d[:, None])


class FoldedVera(torch.autograd.Function):
    """h = x (W0 + diag(b) B_s diag(d) A_s)ᵀ + bias, with W0 and bias frozen.

    Backward: grad_x = g W' (the frozen layer's own product), and b's, d's gradients from P = gᵀu (out, r):
    grad_b = (P ⊙ B_s) d, grad_d = (P ⊙ B_s)ᵀ b. Saved: u only when b or d need a gradient; when x needs one,
    W' itself (keep=True) or nothing beyond the frozen W0 and the vectors, W' being rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, b, d, A_s, B_s, u, keep):
        folded = fold(weight, b, d, A_s, B_s)
        need_x, need_bd = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.rebuild = need_x and not keep
        ctx.save_for_backward(folded if need_x and keep else None, u if need_bd else None, b, d, B_s,
                              weight if ctx.rebuild else None, A_s if ctx.rebuild else None)
        return F.linear(x, folded, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        folded, u, b, d, B_s, weight, A_s = ctx.saved_tensors
        grad_x = grad_b = grad_d = None
        if ctx.rebuild:
            folded = fold(weight, b, d, A_s, B_s)
        if folded is not None:
            grad_x = grad @ folded  # (..., in)
        if u is not None:
            P = grad.reshape(-1, grad.shape[-1]).T @ u.reshape(-1, u.shape[-1])  # (out, r)
            P.mul_(B_s)
            grad_b, grad_d = P @ d, P.T @ b  # (out,), (r,)
        return grad_x, None, None, grad_b, grad_d, None, None, None, None

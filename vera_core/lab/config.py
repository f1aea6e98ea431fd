"""How to train: the budget, batch, optimizer, schedule, evaluation, checkpoints and device of one run."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from ..adapters.checks import positive_float, positive_int
from ..adapters.fused import fast_path_enabled, fast_vera


SCHEDULES = ("linear", "cosine", "constant")
# What VeRA's folded layers do with W' between forward and backward, per `prefer` (adapters/fused.py): "memory"
# rebuilds it in backward (no weight-sized copy per layer), "speed" keeps it wherever a layer folds.
PREFER = {"memory": "rebuild", "speed": "keep"}


def fold_policy(prefer: str) -> AbstractContextManager:
    """The block runs VeRA's folded layers as `prefer` says ("memory" or "speed"); the fast path stays as it is."""
    if prefer not in PREFER:
        raise ValueError(f"prefer must be 'memory' or 'speed', got {prefer!r}.")
    return fast_vera(fast_path_enabled(), PREFER[prefer])


@dataclass
class TrainConfig:
    """How to train: budget, batch, optimizer, schedule, evaluation, checkpoints, device. Validated on construction."""

    steps: int | None = 100  # optimizer steps to run (set to None when `epochs` drives the budget)
    epochs: float | None = None  # passes over the training split instead of `steps` (fractions allowed)
    batch_size: int = 8  # rows per micro-batch (per process under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step; effective batch = batch_size * grad_accum * processes
    max_length: int = 128  # tokens per row; longer rows are truncated (counted in TrainResult.truncated)
    lr: float | None = None  # adapter (or full-model) learning rate; None -> default_lr(method)
    head_lr: float | None = None  # head rate (modules_to_save, or all that trains in head-only runs); None -> default
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_ratio: float = 0.06  # fraction of the steps spent ramping the rate up from 0
    schedule: str = "linear"  # decay after warm-up: "linear" or "cosine" (to 0), or "constant"
    max_grad_norm: float | None = 1.0  # clip the gradient norm to this (None: no clipping)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    eval_every: int | None = None  # evaluate every N steps (None: about 5 evaluations per run, always at the end)
    eval_batches: int | None = None  # cap each validation check during training (None: the whole split)
    checkpoint_every: int | None = None  # write a resumable checkpoint every N steps (needs out_dir)
    seed: int = 0  # seeds torch, random and numpy and orders the batches: a CPU run is exactly repeatable
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    bf16: bool | str = "auto"  # bf16 autocast on CUDA: "auto" (when supported), True, False; never on CPU
    prefer: str = "memory"  # VeRA's folded weights: "memory" rebuilds them in backward unless keeping saves >= 10%
    # of the step; "speed" keeps them (faster, more memory; adapters/fused.py)

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"set exactly one of steps or epochs, got steps={self.steps!r}, epochs={self.epochs!r}; "
                "for an epoch budget write TrainConfig(steps=None, epochs=2)."
            )
        positive_int("steps", self.steps, optional=True)
        positive_float("epochs", self.epochs, optional=True)
        positive_int("batch_size", self.batch_size)
        positive_int("grad_accum", self.grad_accum)
        positive_int("max_length", self.max_length)
        positive_float("lr", self.lr, optional=True)
        positive_float("head_lr", self.head_lr, optional=True)
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, (int, float)) \
                or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        positive_float("max_grad_norm", self.max_grad_norm, optional=True)
        positive_int("eval_every", self.eval_every, optional=True)
        positive_int("eval_batches", self.eval_batches, optional=True)
        positive_int("checkpoint_every", self.checkpoint_every, optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}.")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"device must be 'auto' or a torch device such as 'cpu' or 'cuda', got {self.device!r}."
                ) from None
        if self.bf16 not in ("auto", True, False):
            raise ValueError(f"bf16 must be 'auto', True or False, got {self.bf16!r}.")
        if self.prefer not in PREFER:
            raise ValueError(f"prefer must be 'memory' (least memory) or 'speed' (VeRA keeps its folded weights), "
                             f"got {self.prefer!r}.")

"""The training loop: fine-tune whatever a model has trainable (a VeRA or LoRA adapter, a head, or everything).

One readable loop: AdamW with an adapter and a head learning rate, warm-up then decay, gradient accumulation and
clipping, periodic evaluation, atomic checkpoints that resume onto the exact same loss curve, a stop flag, events for
a UI, and peak-memory measurement. Under `accelerate launch` (DDP) the same loop runs on every rank.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .batches import Encoded, batches, encode
from .data import TextDataset
from .files import atomic_directory, write_json
from .io import save_adapter

SCHEDULES = ("linear", "cosine", "constant")

# Default learning rates per method: (rate for the adapter / main parameters, rate for the classifier head).
DEFAULT_LR: dict[str, tuple[float, float]] = {
    # VeRA paper (Kopiczko et al., ICLR 2024, arXiv 2310.11454), GLUE on RoBERTa-base: the vectors train at
    # 4e-3 to 1e-2 and the classifier head at its own, smaller rate (e.g. MRPC: vectors 1e-2, head 4e-3).
    "vera": (1e-2, 4e-3),
    # LoRA paper (Hu et al., 2021) GLUE runs used 4e-4 to 5e-4; PEFT / QLoRA causal-LM examples use 2e-4.
    # The head, a fresh full layer, trains at the usual 1e-3.
    "lora": (2e-4, 1e-3),
    # Head-only (linear probe): the head is all that trains, at 1e-3.
    "head": (1e-3, 1e-3),
    # Full fine-tuning: BERT / RoBERTa's recommended 2e-5 (range 1e-5 to 5e-5) for every parameter.
    "full": (2e-5, 2e-5),
}

# TrainConfig fields (plus the resolved rates, method, r, ...) that must match for a resume to continue one curve.
_RESUME_FIELDS = ("steps", "epochs", "batch_size", "grad_accum", "max_length", "lr", "head_lr", "weight_decay",
                  "warmup_ratio", "schedule", "max_grad_norm", "seed", "method", "r", "trainable_params", "world_size")
_CHECKPOINT_STATE = "trainer_state.pt"  # optimizer, scheduler and RNG states (tensors and plain values only)


def _positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}.")


def _positive_float(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number{' or None' if optional else ''}, got {value!r}.")


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

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"set exactly one of steps or epochs, got steps={self.steps!r}, epochs={self.epochs!r}; "
                "for an epoch budget write TrainConfig(steps=None, epochs=2)."
            )
        _positive_int("steps", self.steps, optional=True)
        _positive_float("epochs", self.epochs, optional=True)
        _positive_int("batch_size", self.batch_size)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("max_length", self.max_length)
        _positive_float("lr", self.lr, optional=True)
        _positive_float("head_lr", self.head_lr, optional=True)
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, (int, float)) \
                or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        _positive_float("max_grad_norm", self.max_grad_norm, optional=True)
        _positive_int("eval_every", self.eval_every, optional=True)
        _positive_int("eval_batches", self.eval_batches, optional=True)
        _positive_int("checkpoint_every", self.checkpoint_every, optional=True)
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


@dataclass
class TrainResult:
    """What a run did: its curve (history), summary numbers, and where the time and memory went."""

    run_name: str
    method: str  # "vera" | "lora" | "head" | "full"
    steps_done: int  # optimizer steps completed (including those before a resume)
    stopped: bool  # True when the stop flag ended the run early
    history: list[dict]  # the "step" and "eval" events, in order
    final_train_loss: float | None  # mean loss over the last ~10% of steps (at least the last 5)
    eval: dict | None  # the last evaluation (eval_loss, and eval_accuracy in % for classification)
    step_time_s: float | None  # median seconds per optimizer step, the first (warm-up) step excluded
    tokens_per_s: float | None  # non-padding training tokens per second, the first step excluded
    peak_memory_bytes: int  # see peak_memory_kind
    peak_memory_kind: str  # "cuda_max_allocated" (allocator peak) or "cpu_rss_delta" (sampled process RSS peak - start)
    truncated: int  # training rows cut at max_length
    device: str
    dtype: str  # parameter dtype, or "bfloat16-autocast"
    wall_s: float  # the whole call, set-up and evaluations included
    adapter_dir: str | None = None  # where the final adapter was saved (out_dir/adapter), if it was
    checkpoints: list[str] = field(default_factory=list)  # checkpoint directories written by this call


def detect_method(model: nn.Module) -> str:
    """What the model trains, from its trainable parameter names: "vera", "lora", "head" or "full"."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(
            "the model has no trainable parameters: call add_adapter(model, config) first, or unfreeze a head."
        )
    if any(".vera_lambda_" in n for n in names):
        return "vera"
    if any(".lora_A" in n or ".lora_B" in n for n in names):
        return "lora"
    if all(p.requires_grad for p in model.parameters()):
        return "full"
    return "head"


def default_lr(method: str) -> tuple[float, float]:
    """(learning rate, head learning rate) for a method; see DEFAULT_LR for where the numbers come from."""
    if method not in DEFAULT_LR:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(DEFAULT_LR)}.")
    return DEFAULT_LR[method]


def _adapter_rank(model: nn.Module, method: str) -> int | None:
    """r of the adapter, read from the shape of its trainable tensors (d is (r,), LoRA A is (r, in))."""
    for name, param in model.named_parameters():
        if param.requires_grad and method == "vera" and ".vera_lambda_d" in name:
            return param.shape[0]
        if param.requires_grad and method == "lora" and ".lora_A" in name:
            return param.shape[0]
    return None


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _param_groups(model: nn.Module, method: str, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: adapter (or full-model) parameters at `lr`, head parameters at `head_lr`; empty groups dropped."""
    trainable = _trainable(model)
    if method == "head":
        head = list(trainable.values())  # in a head-only run everything trainable is the head
        main = []
    elif method == "full":
        head, main = [], list(trainable.values())  # one rate for the whole model
    else:
        head = [p for n, p in trainable.items() if ".modules_to_save." in n]
        main = [p for n, p in trainable.items() if ".modules_to_save." not in n]
    groups = [{"name": "adapter", "params": main, "lr": lr}, {"name": "head", "params": head, "lr": head_lr}]
    return [dict(g, weight_decay=weight_decay) for g in groups if g["params"]]


def _lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base rate at step s (0-based): linear warm-up over `warmup` steps, then the decay."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)  # never exactly 0, so the first step already learns a little
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def resolve_device(config: TrainConfig) -> torch.device:
    """The device a run uses: CUDA when available for "auto", else what the config names."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if device.type != "cuda" or config.bf16 is False:
        return False
    return torch.cuda.is_bf16_supported()


def _autocast(use_bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _distributed() -> bool:
    """True under torchrun / accelerate launch with more than one process (then accelerate drives DDP)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return initialised or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict:
    """Every random generator the loop touches, as tensors and plain values (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


class _PeakMemory:
    """Peak memory over a block. CUDA: the allocator's peak (`max_memory_allocated`). CPU: this process's RSS,
    sampled every 50 ms in a thread, minus the RSS at entry; per-process sampling can miss spikes under 50 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_delta"
        self.peak_bytes = 0
        self._done = threading.Event()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._done.wait(0.05):
            self._peak_rss = max(self._peak_rss, process.memory_info().rss)

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start_rss = self._peak_rss = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._done.set()
            self._thread.join()
            self._peak_rss = max(self._peak_rss, psutil.Process().memory_info().rss)
            self.peak_bytes = int(self._peak_rss - self._start_rss)


def _check_writable(out_dir: Path) -> None:
    """Fail before training, not after an hour, when results could not be saved."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"out_dir {str(out_dir)!r} is not a writable directory ({e}); choose another out_dir."
        ) from None


@torch.no_grad()
def _evaluate(model: nn.Module, encoded: Encoded, task: str, config: TrainConfig, device: torch.device,
              use_bf16: bool) -> dict:
    """Mean loss per target (response token, or row for classification) and, for classification, accuracy in %."""
    was_training = model.training
    model.eval()
    loss_sum, weight, correct, rows = 0.0, 0, 0, 0
    for i, batch in enumerate(batches(encoded, config.batch_size, shuffle=False, seed=config.seed)):
        if config.eval_batches is not None and i >= config.eval_batches:
            break
        batch = _to(batch, device)
        with _autocast(use_bf16):
            out = model(**batch)
        labels = batch["labels"]
        if task == "classification":
            n = labels.numel()
            correct += (out.logits.argmax(-1) == labels).sum().item()
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
             split: str = "validation") -> dict:
    """Evaluate the model as it is (e.g. before training) on a whole split: {"eval_loss", ["eval_accuracy"]}.

    `config.eval_batches` caps only the quick validation checks during training, never a score reported here."""
    config = replace(config or TrainConfig(), eval_batches=None)
    device = next(model.parameters()).device
    encoded = encode(getattr(dataset, split), tokenizer, dataset.task, config.max_length)
    return _evaluate(model, encoded, dataset.task, config, device, _use_bf16(config, device))


def _micro_batches(encoded: Encoded, config: TrainConfig, rank: int, world: int, skip: int) -> Iterator[dict]:
    """This rank's micro-batches, epoch after epoch, after the first `skip` global ones (those are already trained on).

    Every rank walks the same seeded global order and keeps every world-th batch, so ranks never share a batch.
    """
    i = 0
    for epoch in range(10**9):
        for batch in batches(encoded, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch):
            if i >= skip and i % world == rank:
                yield batch
            i += 1


def _find_checkpoint(path: Path) -> Path:
    """`path` itself, or the latest step-* checkpoint under path or path/checkpoints."""
    if (path / _CHECKPOINT_STATE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        steps = sorted(folder.glob("step-*")) if folder.is_dir() else []
        if steps:
            return steps[-1]
    raise ValueError(f"resume_from={str(path)!r} is not a checkpoint (no {_CHECKPOINT_STATE}) and holds none.")


def _save_checkpoint(out_dir: Path, model: nn.Module, method: str, optimizer, scheduler, step: int,
                     history: list[dict], run_config: dict, rng: dict) -> Path:
    """Write out_dir/checkpoints/step-XXXXXX atomically: trainable tensors, the adapter, optimizer/scheduler/RNG."""
    directory = out_dir / "checkpoints" / f"step-{step:06d}"
    with atomic_directory(directory) as tmp:
        tensors = {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        if method in ("vera", "lora"):
            # The adapter's own files sit flat in the checkpoint, so load_adapter(base, checkpoint) works on it
            # (atomic_directory holds plain files only: save next to it, then move the files in).
            scratch = save_adapter(model, directory.with_name(f".{directory.name}.adapter"), overwrite=True)
            for f in scratch.iterdir():
                os.replace(f, tmp / f.name)
            scratch.rmdir()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / _CHECKPOINT_STATE)
        write_json(tmp / "train_config.json", run_config)
        write_json(tmp / "progress.json", {"step": step, "history": history})
    return directory


def _load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, run_config: dict) -> tuple[int, list[dict]]:
    """Restore a checkpoint into model/optimizer/scheduler/RNGs, after checking it belongs to this configuration."""
    path = _find_checkpoint(Path(path))
    saved = json.loads((path / "train_config.json").read_text())
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {run_config[k]!r}" for k in _RESUME_FIELDS
             if saved.get(k) != run_config[k]]
    if diffs:
        raise ValueError(
            f"cannot resume from {str(path)!r}: it was written by a run with another configuration ("
            + "; ".join(diffs) + "). Resume with the same settings, or start a new run."
        )
    tensors = load_file(str(path / "trainable.safetensors"))
    params = _trainable(model)
    if set(tensors) != set(params):
        raise ValueError(f"cannot resume from {str(path)!r}: its trainable tensors do not match this model's adapter.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    state = torch.load(path / _CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    progress = json.loads((path / "progress.json").read_text())
    return progress["step"], progress["history"]


def _final_loss(history: list[dict]) -> float | None:
    losses = [e["loss"] for e in history if e["type"] == "step"]
    if not losses:
        return None
    n = max(5, len(losses) // 10)
    return sum(losses[-n:]) / len(losses[-n:])


def train(
    model: nn.Module,
    tokenizer,
    dataset: TextDataset,
    config: TrainConfig | None = None,
    *,
    run_name: str = "run",
    out_dir: str | os.PathLike | None = None,
    on_event: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on `dataset.train`, evaluating on `dataset.validation`.

    Events go to `on_event` (JSON-serialisable dicts; the last is "done", "stopped" or "error"). Setting `stop`
    ends the run within one step, adapter intact. With `out_dir` the final adapter goes to out_dir/adapter and
    checkpoints (every `checkpoint_every` steps, and on stop) to out_dir/checkpoints; `resume_from` continues one.
    """
    t_call = time.perf_counter()
    config = config or TrainConfig()
    out_dir = Path(out_dir) if out_dir is not None else None
    if config.checkpoint_every is not None and out_dir is None:
        raise ValueError("checkpoint_every needs out_dir: checkpoints are written to out_dir/checkpoints.")
    if out_dir is not None:
        _check_writable(out_dir)
    method = detect_method(model)
    default, default_head = default_lr(method)
    lr, head_lr = config.lr or default, config.head_lr or default_head

    accelerator = None
    if _distributed():
        from accelerate import Accelerator  # imported only for multi-process runs

        # cpu=True is what makes accelerate start gloo DDP (MULTI_CPU) rather than one process per rank.
        accelerator = Accelerator(cpu=resolve_device(config).type == "cpu")
    device = accelerator.device if accelerator else resolve_device(config)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    use_bf16 = _use_bf16(config, device)
    if any(p.device != device for p in model.parameters()):
        model.to(device)
    core = model  # the plain model (names, saving, evaluation); `model` becomes the DDP wrapper under accelerate

    train_set = encode(dataset.train, tokenizer, dataset.task, config.max_length)
    if not train_set.features:
        raise ValueError(f"data set {dataset.name!r} has no training rows.")
    if train_set.truncated * 2 > train_set.total:
        # Not an error (a short run may want it), but a chat template's system prompt easily eats a small
        # max_length, and a causal LM then learns from a token or two of each response.
        warnings.warn(f"{train_set.truncated} of {train_set.total} training rows are longer than max_length="
                      f"{config.max_length} tokens and were cut; raise max_length to train on whole rows.",
                      stacklevel=2)
    val_set = encode(dataset.validation, tokenizer, dataset.task, config.max_length) if dataset.validation else None
    per_epoch = math.ceil(len(train_set.features) / config.batch_size)  # micro-batches in one pass
    per_step = config.grad_accum * world  # global micro-batches per optimizer step
    total = config.steps or max(1, math.ceil(config.epochs * per_epoch / per_step))
    eval_every = config.eval_every or max(1, total // 5)

    optimizer = torch.optim.AdamW(_param_groups(core, method, lr, head_lr, config.weight_decay))
    warmup = int(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config.schedule, warmup, total))
    run_config = {**asdict(config), "lr": lr, "head_lr": head_lr, "method": method, "r": _adapter_rank(core, method),
                  "trainable_params": sum(p.numel() for p in _trainable(core).values()), "world_size": world}
    step, history = 0, []
    if resume_from is not None:
        step, history = _load_checkpoint(Path(resume_from), core, optimizer, scheduler, run_config)
    else:
        _seed_everything(config.seed)
    if config.grad_checkpointing:
        if not getattr(core, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"{type(core).__name__} does not support gradient checkpointing; set grad_checkpointing=False."
            )
        # Non-reentrant checkpointing back-propagates to the adapter even though the frozen inputs need no grad,
        # so enable_input_require_grads (needed by the reentrant variant) is not. (transformers 5 renamed
        # gradient_checkpointing_enable to activation_checkpointing_enable.)
        core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if accelerator:
        # DDP all-reduces gradients in backward; the scheduler stays ours (accelerate's would step once per process).
        model, optimizer = accelerator.prepare(model, optimizer)
    is_main = rank == 0
    trainable = list(_trainable(core).values())
    stream = _micro_batches(train_set, config, rank, world, skip=step * per_step)
    memory = _PeakMemory(device)
    step_times: list[float] = []
    step_tokens: list[int] = []
    checkpoints: list[str] = []
    t_start = time.perf_counter()

    def emit(kind: str, **fields) -> None:
        event = {"type": kind, "run": run_name, "step": step, "total": total,
                 "elapsed_s": round(time.perf_counter() - t_start, 3), **fields}
        if kind in ("step", "eval"):
            history.append(event)
        if on_event is not None and is_main:
            on_event(event)

    def stop_requested() -> bool:
        wanted = stop is not None and stop.is_set()
        if accelerator:  # every rank must leave the loop together, or the others wait forever in all-reduce
            flag = torch.tensor(float(wanted), device=device)
            wanted = accelerator.reduce(flag, reduction="sum").item() > 0
        return wanted

    def checkpoint(rng: dict) -> None:
        if is_main:
            path = _save_checkpoint(out_dir, core, method, optimizer, scheduler, step, history, run_config, rng)
            checkpoints.append(str(path))
            emit("checkpoint", path=str(path))
        if accelerator:
            accelerator.wait_for_everyone()

    stopped = False
    model.train()
    try:
        with memory:
            emit("start", method=method, device=str(device), trainable_params=run_config["trainable_params"],
                 truncated=train_set.truncated, world_size=world, lr=lr, head_lr=head_lr)
            while step < total:
                rng_at_step_start = _rng_state()  # a stop mid-step checkpoints this, so a resume redoes the step
                t0 = time.perf_counter()
                loss_sum, tokens = 0.0, 0
                for micro in range(config.grad_accum):
                    if stop_requested():
                        stopped = True
                        break
                    batch = _to(next(stream), device)
                    last = micro == config.grad_accum - 1
                    # Under DDP only the last micro-batch of a step all-reduces its gradients.
                    sync = accelerator.no_sync(model) if accelerator and not last else contextlib.nullcontext()
                    with sync:
                        with _autocast(use_bf16):
                            loss = model(**batch).loss
                        scaled = loss / config.grad_accum  # the step's gradient is the mean over its micro-batches
                        accelerator.backward(scaled) if accelerator else scaled.backward()
                    loss_sum += loss.detach().float().item()
                    tokens += int(batch["attention_mask"].sum())
                if stopped:
                    optimizer.zero_grad(set_to_none=True)
                    _set_rng_state(rng_at_step_start)
                    break
                loss_value = loss_sum / config.grad_accum
                if accelerator:
                    both = accelerator.reduce(torch.tensor([loss_value, tokens], device=device, dtype=torch.float64))
                    loss_value, tokens = both[0].item() / world, int(both[1].item())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"the training loss became {loss_value} at step {step + 1}; the parameters were not updated. "
                        f"Lower the learning rate (now {lr:g}) or keep max_grad_norm set."
                    )
                grad_norm = None
                if config.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
                rates = [g["lr"] for g in optimizer.param_groups]  # the rates this step used
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_times.append(time.perf_counter() - t0)
                step_tokens.append(tokens)
                mean_time = sum(step_times) / len(step_times)
                emit("step", loss=loss_value, lr=rates[0], head_lr=rates[-1], grad_norm=grad_norm,
                     tokens_per_s=tokens / step_times[-1], eta_s=mean_time * (total - step),
                     epoch=step * per_step / per_epoch)
                if val_set is not None and (step % eval_every == 0 or step == total):
                    emit("eval", **_evaluate(core, val_set, dataset.task, config, device, use_bf16))
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    checkpoint(_rng_state())
            if stopped and out_dir is not None:
                checkpoint(_rng_state())
            adapter_dir = None
            if out_dir is not None and method in ("vera", "lora") and is_main:
                adapter_dir = str(save_adapter(core, out_dir / "adapter"))
            emit("stopped" if stopped else "done", final_train_loss=_final_loss(history))
    except torch.cuda.OutOfMemoryError as e:
        emit("error", message=f"CUDA out of memory at step {step + 1}")
        raise RuntimeError(
            f"CUDA ran out of memory at step {step + 1} (batch_size={config.batch_size}, "
            f"max_length={config.max_length}). Try a smaller batch_size (with grad_accum to keep the effective batch), "
            "a shorter max_length, grad_checkpointing=True, or a 4-bit base model (quantization='4bit')."
        ) from e
    except Exception as e:
        emit("error", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        model.eval()
        if config.grad_checkpointing:
            core.activation_checkpointing_disable()

    timed = step_times[1:] or step_times  # the first step pays for warm-up (allocations, lazy init)
    timed_tokens = step_tokens[1:] or step_tokens
    evals = [e for e in history if e["type"] == "eval"]
    return TrainResult(
        run_name=run_name,
        method=method,
        steps_done=step,
        stopped=stopped,
        history=history,
        final_train_loss=_final_loss(history),
        eval={k: evals[-1][k] for k in evals[-1] if k.startswith("eval_")} if evals else None,
        step_time_s=statistics.median(timed) if timed else None,
        tokens_per_s=sum(timed_tokens) / sum(timed) if timed else None,
        peak_memory_bytes=memory.peak_bytes,
        peak_memory_kind=memory.kind,
        truncated=train_set.truncated,
        device=str(device),
        dtype="bfloat16-autocast" if use_bf16 else str(next(core.parameters()).dtype).removeprefix("torch."),
        wall_s=time.perf_counter() - t_call,
        adapter_dir=adapter_dir,
        checkpoints=checkpoints,
    )

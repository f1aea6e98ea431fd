"""The training loop: fine-tune whatever a model has trainable (a VeRA or LoRA adapter, a head, or everything).

One readable loop: AdamW with an adapter and a head learning rate, warm-up then decay, gradient accumulation and
clipping, periodic evaluation, atomic checkpoints that resume onto the exact same loss curve, a stop flag, events for
a UI, and peak-memory measurement. Under `accelerate launch` (DDP) the same loop runs on every rank.

`train` reads as its steps: `_set_up` (checks, data, optimizer, schedule, resume), `_optimizer_step`,
`_evaluate_if_due`, `_checkpoint`, and `_result`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .batches import Encoded, batches, encode
from .config import TrainConfig, fold_policy
from .data import TextDataset
from .device import autocast, resolve_device, to_device, use_bf16
from .evaluate import evaluate_encoded
from ..adapters.files import WriteError, atomic_directory, write_json
from ..adapters.inject import active_adapter, adapter_configs, adapter_parameters
from ..adapters.io import save_adapter
from .memtrack import MemoryTracker
from .models import enable_grad_checkpointing, head_names
from .progress import with_bar

# Default learning rates per method: (rate for the adapter / main parameters, rate for the classifier head).
DEFAULT_LR: dict[str, tuple[float, float]] = {
    # VeRA and LoRA: the project's own tuning records (benchmarks/results/quality.json `tuned_lr`, every method on
    # the same grid and budget, validation loss): the geometric mean of the chosen rates within each task (SST-2,
    # Rotten Tomatoes, E2E), then across the tasks, rounded to one significant figure (tests/test_train.py
    # recomputes it). VeRA's vectors: 3.7e-2 -> 4e-2 (the VeRA paper's RoBERTa GLUE runs used 4e-3 to 1e-2);
    # LoRA: 1.0e-3 (the LoRA paper's GLUE runs used 4e-4 to 5e-4). The head trains at the same rate under every
    # method: a head rate that differed by method would confound the comparison (tuning moves the adapter's rate only;
    # head-only's tuned rate, when it is tuned, becomes every method's head rate: RunRequest.rates).
    "vera": (4e-2, 1e-2),
    "lora": (1e-3, 1e-2),
    # Head-only (linear probe), and every method's classifier head: benchmarks/results/head_rate.md, head-only on
    # Rotten Tomatoes at 1e-3, 1e-2, 1e-1 for all-MiniLM-L6-v2 (best 1e-1) and SmolLM2-135M-Instruct (best 1e-2; at
    # 1e-1 its validation loss is 3.9x its best): the rate whose loss is worst-case closest to each model's best
    # (tests/test_train.py recomputes it). A new head's best rate moves with the features it reads, so no one
    # default fits every model: tune head-only (its grid spans x0.25..x64, tune.HEAD_LR_SCALES) when the head matters.
    "head": (1e-2, 1e-2),
    # Full fine-tuning: BERT / RoBERTa's recommended 2e-5 (range 1e-5 to 5e-5) for every parameter.
    "full": (2e-5, 2e-5),
}

# TrainConfig fields (plus the resolved rates, method, r, ...) that must match for a resume to continue one curve.
_RESUME_FIELDS = ("steps", "epochs", "batch_size", "grad_accum", "max_length", "lr", "head_lr", "weight_decay",
                  "warmup_ratio", "schedule", "max_grad_norm", "seed", "method", "r", "trainable_params", "world_size")
_CHECKPOINT_STATE = "trainer_state.pt"  # optimizer, scheduler and RNG states (tensors and plain values only)
# Steps whose tensors are tracked: the peak is reached within them (step 1 allocates the optimizer state, step 2 is
# the first with it already there), and the later steps run at full speed without the tracker's per-op cost.
TRACKED_STEPS = 3


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
    peak_memory_bytes: int | None  # peak live tensor bytes on the device over the tracked steps (None: no step ran)
    peak_memory_kind: str  # "tensors": the tensor tracker's peak (memtrack.py), on CPU and CUDA alike
    memory_breakdown: dict | None  # bytes per category at that peak: weights, adapter, gradients, optimizer, ...
    peak_rss_bytes: int  # the process's resident memory at its sampled peak (everything, not only tensors)
    cuda_max_allocated_bytes: int | None  # CUDA: torch.cuda.max_memory_allocated over the run, a cross-check
    truncated: int  # training rows cut at max_length
    device: str
    dtype: str  # parameter dtype, or "bfloat16-autocast"
    wall_s: float  # the whole call, set-up and evaluations included
    adapter_dir: str | None = None  # where the final adapter was saved (out_dir/adapter), if it was
    checkpoints: list[str] = field(default_factory=list)  # checkpoint directories written by this call


def detect_method(model: nn.Module) -> str:
    """What the model trains: its active adapter's method ("vera", "lora"), else "full" or "head"."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameters: call add_adapter(model, config) first, or unfreeze a head."
        )
    name = active_adapter(model)
    if name is not None and any(p.requires_grad for p in adapter_parameters(model, name)["adapter"]):
        return adapter_configs(model)[name].method
    if all(p.requires_grad for p in model.parameters()):
        return "full"
    return "head"


def default_lr(method: str) -> tuple[float, float]:
    """(learning rate, head learning rate) for a method; see DEFAULT_LR for where the numbers come from."""
    if method not in DEFAULT_LR:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(DEFAULT_LR)}.")
    return DEFAULT_LR[method]


def _adapter_rank(model: nn.Module, method: str) -> int | None:
    return adapter_configs(model)[active_adapter(model)].r if method in ("vera", "lora") else None


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _param_groups(model: nn.Module, method: str, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: adapter (or full-model) parameters at `lr`, head parameters at `head_lr`; empty groups dropped."""
    trainable = list(_trainable(model).values())
    if method == "head":
        head, main = trainable, []  # in a head-only run everything trainable is the head
    elif method == "full":
        head, main = [], trainable  # one rate for the whole model
    else:
        head_ids = {id(p) for p in adapter_parameters(model)["head"]}
        head = [p for p in trainable if id(p) in head_ids]
        main = [p for p in trainable if id(p) not in head_ids]
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
    """Process-level peaks over a block, beside the tracker's tensor peak: this process's RSS, sampled every 50 ms in
    a thread (it can miss spikes under 50 ms), and on CUDA the allocator's peak (`max_memory_allocated`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_bytes = 0
        self.cuda_max_allocated_bytes: int | None = None
        self._done = threading.Event()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._done.wait(0.05):
            self.rss_bytes = max(self.rss_bytes, process.memory_info().rss)

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_bytes = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.rss_bytes = max(self.rss_bytes, psutil.Process().memory_info().rss)
        if self.device.type == "cuda":
            self.cuda_max_allocated_bytes = int(torch.cuda.max_memory_allocated(self.device))


def _check_writable(out_dir: Path) -> None:
    """Fail before training, not after an hour, when results could not be saved."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a good directory on a full disk: the usual write failure
            raise WriteError(out_dir, e.strerror.lower(), "nothing was trained") from None
        raise ValueError(
            f"out_dir {str(out_dir)!r} is not a writable directory ({e}); choose another out_dir."
        ) from None


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


class _WriteRecorder:
    """A file for torch.save that keeps the OSError of a failed write: torch reports it as "unexpected pos" only."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _save_state(obj, path: Path) -> None:
    """torch.save(obj, path); a failed write raises its own OSError (a full disk says so)."""
    with open(path, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


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
        _save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
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


@dataclass
class _Session:
    """One `train` call's set-up and running state, shared by its named steps."""

    model: nn.Module  # what forward / backward run: the DDP wrapper under accelerate, else the model itself
    core: nn.Module  # the plain model (parameter names, saving, evaluation)
    task: str
    config: TrainConfig
    run_name: str
    method: str
    lr: float
    head_lr: float
    device: torch.device
    bf16: bool
    accelerator: object | None
    rank: int
    world: int
    train_set: Encoded
    val_set: Encoded | None
    total: int  # optimizer steps of the whole run
    eval_every: int
    per_step: int  # global micro-batches per optimizer step
    per_epoch: int  # micro-batches in one pass over the training split
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    run_config: dict  # what a resume must match (see _RESUME_FIELDS)
    out_dir: Path | None
    on_event: Callable[[dict], None] | None
    step: int = 0
    history: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)
    tracker: MemoryTracker | None = None  # tensor memory of the first TRACKED_STEPS steps of this call
    tracked: int = 0  # steps of this call run under the tracker

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def emit(self, kind: str, **fields) -> None:
        event = {"type": kind, "run": self.run_name, "step": self.step, "total": self.total,
                 "elapsed_s": round(time.perf_counter() - self.t_start, 3), **fields}
        if kind in ("step", "eval"):
            self.history.append(event)
        if self.on_event is not None and self.is_main:
            self.on_event(event)


def _set_up(model: nn.Module, tokenizer, dataset: TextDataset, config: TrainConfig, run_name: str,
            out_dir: Path | None, on_event, resume_from) -> _Session:
    """Check the request, encode the data, build the optimizer and schedule, then resume or seed."""
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
        accelerator = Accelerator(cpu=resolve_device(config.device).type == "cpu")
    device = accelerator.device if accelerator else resolve_device(config.device)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if any(p.device != device for p in model.parameters()):
        model.to(device)

    train_set = encode(dataset.train, tokenizer, dataset.task, config.max_length)
    if not train_set.features:
        raise ValueError(f"data set {dataset.name!r} has no training rows.")
    if train_set.truncated * 2 > train_set.total:
        # Not an error (a short run may want it), but a chat template's system prompt easily eats a small
        # max_length, and a causal LM then learns from a token or two of each response.
        warnings.warn(f"{train_set.truncated} of {train_set.total} training rows are longer than max_length="
                      f"{config.max_length} tokens and were cut; raise max_length to train on whole rows.",
                      stacklevel=3)
    frozen_heads = [n for n in head_names(model) if not any(p.requires_grad for p in getattr(model, n).parameters())]
    if dataset.task == "classification" and method in ("vera", "lora") and frozen_heads:
        # add_adapter freezes everything it does not adapt, a head made for a new task included: it stays random.
        warnings.warn(f"the classifier head ({', '.join(frozen_heads)}) is frozen and keeps its initial weights "
                      f"(random for a model loaded for a new task); pass modules_to_save={frozen_heads!r} in the "
                      "adapter config to train it beside the adapter (compare does).", stacklevel=3)
    val_set = encode(dataset.validation, tokenizer, dataset.task, config.max_length) if dataset.validation else None
    per_epoch = math.ceil(len(train_set.features) / config.batch_size)
    per_step = config.grad_accum * world
    total = config.steps or max(1, math.ceil(config.epochs * per_epoch / per_step))

    optimizer = torch.optim.AdamW(_param_groups(model, method, lr, head_lr, config.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(config.schedule, int(config.warmup_ratio * total), total))
    run_config = {**asdict(config), "lr": lr, "head_lr": head_lr, "method": method, "r": _adapter_rank(model, method),
                  "trainable_params": sum(p.numel() for p in _trainable(model).values()), "world_size": world}
    session = _Session(
        model=model, core=model, task=dataset.task, config=config, run_name=run_name, method=method, lr=lr,
        head_lr=head_lr, device=device, bf16=use_bf16(config.bf16, device), accelerator=accelerator, rank=rank,
        world=world, train_set=train_set, val_set=val_set, total=total, eval_every=config.eval_every or max(1, total // 5),
        per_step=per_step, per_epoch=per_epoch, optimizer=optimizer, scheduler=scheduler, run_config=run_config,
        out_dir=out_dir, on_event=on_event)
    session.tracker = MemoryTracker(model, optimizer, device)
    if resume_from is not None:
        session.step, session.history = _load_checkpoint(Path(resume_from), model, optimizer, scheduler, run_config)
    else:
        _seed_everything(config.seed)
    if config.grad_checkpointing:
        enable_grad_checkpointing(model)
    if accelerator:
        # DDP all-reduces gradients in backward; the scheduler stays ours (accelerate's would step once per process).
        session.model, session.optimizer = accelerator.prepare(model, optimizer)
    return session


def _stop_requested(s: _Session, stop: threading.Event | None) -> bool:
    wanted = stop is not None and stop.is_set()
    if s.accelerator:  # every rank must leave the loop together, or the others wait forever in all-reduce
        flag = torch.tensor(float(wanted), device=s.device)
        wanted = s.accelerator.reduce(flag, reduction="sum").item() > 0
    return wanted


def _optimizer_step(s: _Session, stream: Iterator[dict], stop: threading.Event | None) -> bool:
    """One optimizer step over `grad_accum` micro-batches; False when a stop request cut it short (nothing applied,
    and the random generators put back, so a resume redoes the step exactly)."""
    rng_at_step_start = _rng_state()
    tracking = s.tracked < TRACKED_STEPS
    with s.tracker if tracking else contextlib.nullcontext():
        done = _step_body(s, stream, stop, rng_at_step_start)
    s.tracked += tracking and done
    if tracking and s.tracked == TRACKED_STEPS:
        s.tracker.close()
    return done


def _step_body(s: _Session, stream: Iterator[dict], stop: threading.Event | None, rng_at_step_start: dict) -> bool:
    t0 = time.perf_counter()
    loss_sum, tokens = 0.0, 0
    for micro in range(s.config.grad_accum):
        if _stop_requested(s, stop):
            s.optimizer.zero_grad(set_to_none=True)
            _set_rng_state(rng_at_step_start)
            return False
        batch = to_device(next(stream), s.device)
        last = micro == s.config.grad_accum - 1
        # Under DDP only the last micro-batch of a step all-reduces its gradients.
        sync = s.accelerator.no_sync(s.model) if s.accelerator and not last else contextlib.nullcontext()
        with sync:
            with autocast(s.bf16):
                loss = s.model(**batch).loss
            scaled = loss / s.config.grad_accum  # the step's gradient is the mean over its micro-batches
            s.accelerator.backward(scaled) if s.accelerator else scaled.backward()
        loss_sum += loss.detach().float().item()
        tokens += int(batch["attention_mask"].sum())
    loss_value = loss_sum / s.config.grad_accum
    if s.accelerator:
        both = s.accelerator.reduce(torch.tensor([loss_value, tokens], device=s.device, dtype=torch.float64))
        loss_value, tokens = both[0].item() / s.world, int(both[1].item())
    if not math.isfinite(loss_value):
        raise FloatingPointError(
            f"the training loss became {loss_value} at step {s.step + 1}; the parameters were not updated. "
            f"Lower the learning rate (now {s.lr:g}) or keep max_grad_norm set."
        )
    grad_norm = None
    if s.config.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(_trainable(s.core).values()), s.config.max_grad_norm))
    rates = [g["lr"] for g in s.optimizer.param_groups]  # the rates this step used
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    s.step_times.append(time.perf_counter() - t0)
    s.step_tokens.append(tokens)
    mean_time = sum(s.step_times) / len(s.step_times)
    s.emit("step", loss=loss_value, lr=rates[0], head_lr=rates[-1], grad_norm=grad_norm,
           tokens_per_s=tokens / s.step_times[-1], eta_s=mean_time * (s.total - s.step),
           epoch=s.step * s.per_step / s.per_epoch)
    return True


def _evaluate_if_due(s: _Session) -> None:
    if s.val_set is not None and (s.step % s.eval_every == 0 or s.step == s.total):
        s.emit("eval", **evaluate_encoded(s.core, s.val_set, s.task, s.config, s.device, s.bf16))


def _checkpoint(s: _Session) -> None:
    if s.is_main:
        path = _save_checkpoint(s.out_dir, s.core, s.method, s.optimizer, s.scheduler, s.step, s.history,
                                s.run_config, _rng_state())
        s.checkpoints.append(str(path))
        s.emit("checkpoint", path=str(path))
    if s.accelerator:
        s.accelerator.wait_for_everyone()


def _result(s: _Session, stopped: bool, memory: _PeakMemory, adapter_dir: str | None, wall_s: float) -> TrainResult:
    # Step times leave out the tracked steps (slowed by the tracker; the first also pays for warm-up) when later
    # steps exist, else only the first step.
    skip = s.tracked if len(s.step_times) > s.tracked else 1
    timed = s.step_times[skip:] or s.step_times
    timed_tokens = s.step_tokens[skip:] or s.step_tokens
    evals = [e for e in s.history if e["type"] == "eval"]
    return TrainResult(
        run_name=s.run_name,
        method=s.method,
        steps_done=s.step,
        stopped=stopped,
        history=s.history,
        final_train_loss=_final_loss(s.history),
        eval={k: evals[-1][k] for k in evals[-1] if k.startswith("eval_")} if evals else None,
        step_time_s=statistics.median(timed) if timed else None,
        tokens_per_s=sum(timed_tokens) / sum(timed) if timed else None,
        peak_memory_bytes=s.tracker.peak_bytes if s.tracked else None,
        peak_memory_kind="tensors",
        memory_breakdown=s.tracker.breakdown() if s.tracked else None,
        peak_rss_bytes=memory.rss_bytes,
        cuda_max_allocated_bytes=memory.cuda_max_allocated_bytes,
        truncated=s.train_set.truncated,
        device=str(s.device),
        dtype="bfloat16-autocast" if s.bf16 else str(next(s.core.parameters()).dtype).removeprefix("torch."),
        wall_s=wall_s,
        adapter_dir=adapter_dir,
        checkpoints=s.checkpoints,
    )


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
    progress: bool | None = None,
    keep_adapter: bool = True,
) -> TrainResult:
    """Train the model's trainable parameters on `dataset.train`, evaluating on `dataset.validation`.

    Events go to `on_event` (JSON-serialisable dicts; the last is "done", "stopped" or "error"). Setting `stop`
    ends the run within one step, adapter intact. With `out_dir` the final adapter goes to out_dir/adapter and
    checkpoints (every `checkpoint_every` steps, and on stop) to out_dir/checkpoints; `resume_from` continues one.
    keep_adapter=False skips the final save (a tuning run keeps only its score).
    progress: a tqdm bar with loss and ETA (None: shown when no `on_event` is given and a terminal or notebook shows
    the output).
    """
    t_call = time.perf_counter()
    config = config or TrainConfig()
    on_event = with_bar(progress, on_event)
    out_dir = Path(out_dir) if out_dir is not None else None
    s = _set_up(model, tokenizer, dataset, config, run_name, out_dir, on_event, resume_from)
    stream = _micro_batches(s.train_set, config, s.rank, s.world, skip=s.step * s.per_step)
    memory = _PeakMemory(s.device)
    stopped, adapter_dir = False, None
    s.model.train()
    try:
        with memory, fold_policy(config.prefer):  # VeRA keeps or rebuilds its folded weights as asked
            s.emit("start", method=s.method, device=str(s.device), trainable_params=s.run_config["trainable_params"],
                   truncated=s.train_set.truncated, world_size=s.world, lr=s.lr, head_lr=s.head_lr)
            while s.step < s.total:
                if not _optimizer_step(s, stream, stop):
                    stopped = True
                    break
                _evaluate_if_due(s)
                if config.checkpoint_every and s.step % config.checkpoint_every == 0:
                    _checkpoint(s)
            if stopped and out_dir is not None:
                _checkpoint(s)
            if keep_adapter and out_dir is not None and s.method in ("vera", "lora") and s.is_main:
                adapter_dir = str(save_adapter(s.core, out_dir / "adapter"))
            s.emit("stopped" if stopped else "done", final_train_loss=_final_loss(s.history))
    except torch.cuda.OutOfMemoryError as e:
        s.emit("error", message=f"CUDA out of memory at step {s.step + 1}")
        raise RuntimeError(
            f"CUDA ran out of memory at step {s.step + 1} (batch_size={config.batch_size}, "
            f"max_length={config.max_length}). Try a smaller batch_size (with grad_accum to keep the effective batch), "
            "a shorter max_length, grad_checkpointing=True, or a 4-bit base model (quantization='4bit')."
        ) from e
    except Exception as e:
        with contextlib.suppress(OSError):  # a log that cannot be written (a full disk) must not hide `e`
            s.emit("error", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        s.model.eval()
        if config.grad_checkpointing:
            s.core.activation_checkpointing_disable()
    return _result(s, stopped, memory, adapter_dir, time.perf_counter() - t_call)

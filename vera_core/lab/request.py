"""What a comparison is asked to do, checked before anything runs: `RunRequest`, its planned runs and its estimate.

The CLI and the app turn their input into one RunRequest; `compare.run_request` runs it. Constructing one checks
every value without touching a file; `prepare()` then loads the data set named by a string and checks what needs
the data and the model's config. `run_request` prepares first, so bad input fails before a run directory exists.

    request = RunRequest("minilm-l6", "rotten-tomatoes", methods=("base", "vera", "lora"), max_rows=64)
    [spec.name for spec in request.plan()]      # ['base', 'vera-r256', 'lora-r8']  (no file read yet)
    request.prepare().estimate()                # loads the data set and the model's config, once
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import psutil
import torch

from ..adapters.checks import positive_int
from .config import TrainConfig
from ..adapters.config import AdapterConfig, LoraConfig, VeraConfig, config_from_dict
from ..adapters.count import count_parameters, estimate_parameters, meta_model
from .data import TASKS, TextDataset, load_dataset
from .device import resolve_device
from .memory import estimate_memory
from .models import QUANTIZATIONS, model_config

METHODS = ("base", "head", "vera", "lora", "full")
MAX_RUNS = 60  # runs (seeds × settings, plus tuning runs) one request may make unless max_runs is raised
TUNE_GRIDS = ("lr_scale", "head_lr_scale")  # every trained setting's grid; head-only's own (default: lr_scale)


class TooManyRuns(ValueError):
    """The request makes more runs than its `max_runs`: a typo in a grid can make hundreds. Callers that ask for
    the user's yes in their own words (the lab's tick box) catch it and read `runs` and `limit`."""

    def __init__(self, runs: int, final: int, tuning: int, limit: int):
        super().__init__(f"this request makes {runs} runs ({final} final, {tuning} tuning"
                         f"{' with their second seeds' * bool(tuning)}), more than the limit of {limit}; pass "
                         f"max_runs={runs} to run them all.")
        self.runs, self.limit = runs, limit


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: its report name, its method, its adapter config (None for base/head/full), its
    training seed, and its setting: the name without the seed, shared by the runs that are averaged over seeds."""

    name: str
    method: str
    adapter: AdapterConfig | None
    seed: int = 0
    setting: str = ""


@dataclass
class RunRequest:
    """Everything one comparison needs, validated on construction without reading a file; `prepare()` loads a data
    set given by name and runs the checks that need data or the model's config."""

    model: object  # a `load_model` name or path, or a loaded (model, tokenizer) pair (deep-copied per method)
    dataset: TextDataset | str  # a TextDataset, or a `load_dataset` name / file (split with train.seed, max_rows)
    methods: Sequence[str] | str = ("base", "vera", "lora")
    vera: VeraConfig | Sequence[VeraConfig] = field(default_factory=VeraConfig)  # several: one run each
    lora: LoraConfig | Sequence[LoraConfig] = field(default_factory=LoraConfig)  # several: one run each
    train: TrainConfig = field(default_factory=TrainConfig)
    lrs: dict[str, float] = field(default_factory=dict)  # per-method learning rate; else train.lr, else the default
    task: str | None = None  # for a data set loaded by name: None = the data set's own task
    max_rows: int | None = None  # cap every split of a data set loaded by name
    quantization: str | None = None  # "4bit" / "8bit" base weights (bitsandbytes)
    trust_remote_code: bool = False  # the caller's explicit opt-in for models that ship code
    isolate: bool = False  # each method in its own process, so its CPU peak memory is its own
    eval_generate: int = 32  # test groups scored with BLEU / ROUGE-L (causal LM)
    samples: int = 8  # test inputs whose outputs go to samples.jsonl
    seeds: Sequence[int] | None = None  # training seeds, one run per setting each (None: train.seed); the split stays
    tune: dict | None = None  # {"lr_scale": [0.25, 0.5, 1, 2, 4]}: each method's rates × each scale, on validation
    tune_steps: int | None = None  # steps of each tuning run (None: the runs' own budget)
    score_tuning: bool = False  # also score every tuning point on the test split: the rate's sensitivity, for reading
    max_runs: int | None = MAX_RUNS  # more runs than this (tuning included) raise TooManyRuns; None: no limit
    dataset_source: str | None = field(default=None, init=False)  # the name or file the data set was loaded from

    def __post_init__(self):
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        self.methods = list(dict.fromkeys(self.methods))  # keeps order, drops repeats
        self.vera = [self.vera] if isinstance(self.vera, VeraConfig) else list(self.vera)
        self.lora = [self.lora] if isinstance(self.lora, LoraConfig) else list(self.lora)
        if not all(isinstance(v, VeraConfig) for v in self.vera) or not all(isinstance(c, LoraConfig)
                                                                            for c in self.lora):
            raise ValueError("vera must be VeraConfig(s) (see vera_grid) and lora LoraConfig(s) (see lora_grid).")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {type(self.train).__name__}.")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose one of {list(QUANTIZATIONS)}.")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {list(TASKS)} or None (the data set's own).")
        positive_int("max_rows", self.max_rows, optional=True)
        if not isinstance(self.score_tuning, bool):
            raise ValueError(f"score_tuning must be True or False, got {self.score_tuning!r}.")
        for name in ("eval_generate", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        self._check_seeds_and_tuning()
        for method, rate in self.lrs.items():
            if method not in METHODS:
                raise ValueError(f"a learning rate is given for unknown method {method!r}; methods: {list(METHODS)}.")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
                raise ValueError(f"the {method} learning rate must be a positive number, got {rate!r}.")
        if isinstance(self.model, (str, os.PathLike)):
            self.model = str(self.model).strip()
            if not self.model:
                raise ValueError("the model name is empty; give an offline name, a Hub id or a local folder.")
        elif self.isolate:
            raise ValueError("isolate=True loads the model in each process: pass its name or path, not a loaded model.")
        # The plan depends on the fields alone: made once here (unknown methods and clashing names fail now).
        self._settings = self._make_settings()
        self._plan = self._make_plan()
        self._tuning_plan = self._make_tuning_plan()
        # The cap counts the runs made for sure; near-ties can add at most one run per grid point (`tie_runs`).
        if self.max_runs is not None and self.run_count() > self.max_runs:
            raise TooManyRuns(self.run_count(), len(self._plan), len(self._tuning_plan) + self.tie_runs()[0],
                              self.max_runs)
        resolve_device(self.train.device)  # "cuda" on a machine without one
        self._prepared = False
        if isinstance(self.dataset, (str, os.PathLike)):
            self.dataset_source = str(self.dataset)
        else:
            self._check_data()

    def prepare(self) -> "RunRequest":
        """Load a data set given by name (split with train.seed, max_rows per split) and check what needs the data
        and the model's config: one-line errors for unreadable files, missing columns, one-label data, "head" on a
        causal LM, tuning without validation, max_length beyond the model. Runs once; returns the request."""
        if self._prepared:
            return self
        if not isinstance(self.dataset, TextDataset):
            self.dataset = load_dataset(self.dataset, self.task, seed=self.train.seed, max_rows=self.max_rows)
            self._check_data()
        limit = getattr(self.model_config(), "max_position_embeddings", None)  # (a model name that resolves to nothing)
        if limit and self.train.max_length > limit:
            raise ValueError(f"max_length {self.train.max_length} is longer than the model takes "
                             f"(max_position_embeddings = {limit}); choose max_length <= {limit}.")
        self._prepared = True
        return self

    def _check_data(self) -> None:
        if "head" in self.methods and self.dataset.task != "classification":
            raise ValueError("method 'head' trains a classifier head only: it needs a classification data set.")
        if self.tune and not self.dataset.validation:
            raise ValueError("tuning chooses learning rates on the validation split, and this data set has none.")

    def _data(self) -> TextDataset:
        if not isinstance(self.dataset, TextDataset):
            raise RuntimeError(f"the data set {self.dataset_source!r} is not loaded yet; call request.prepare() first.")
        return self.dataset

    def to_dict(self) -> dict | None:
        """What `from_dict` needs to make this request again (None when the model or data were passed as objects)."""
        if not self.loads_by_name or self.dataset_source is None:
            return None
        return {"model": self.model, "dataset": self.dataset_source, "task": self.task, "max_rows": self.max_rows,
                "methods": self.methods, "vera": [v.to_dict() for v in self.vera], "lora": [c.to_dict() for c in self.lora],
                "train": asdict(self.train), "lrs": self.lrs, "quantization": self.quantization,
                "trust_remote_code": self.trust_remote_code, "isolate": self.isolate,
                "eval_generate": self.eval_generate, "samples": self.samples, "seeds": self.seeds, "tune": self.tune,
                "tune_steps": self.tune_steps, "score_tuning": self.score_tuning, "max_runs": self.max_runs}

    @classmethod
    def from_dict(cls, data: dict) -> "RunRequest":
        loras = data["lora"] if isinstance(data["lora"], list) else [data["lora"]]  # one dict: written before sweeps
        return cls(**{**data, "vera": [config_from_dict(v) for v in data["vera"]],
                      "lora": [config_from_dict(c) for c in loras], "train": TrainConfig(**data["train"])})

    def _check_seeds_and_tuning(self) -> None:
        self.seeds = [self.train.seed] if self.seeds is None else list(self.seeds)
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds!r}.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed; each seed runs once, so list it once.")
        positive_int("tune_steps", self.tune_steps, optional=True)
        positive_int("max_runs", self.max_runs, optional=True)
        if self.tune is None:
            return
        if not isinstance(self.tune, dict) or "lr_scale" not in self.tune or not set(self.tune) <= set(TUNE_GRIDS):
            raise ValueError(f"tune must be {{'lr_scale': [scales]}}, e.g. {{'lr_scale': [0.25, 0.5, 1, 2, 4]}}, "
                             f"optionally with head-only's own grid as 'head_lr_scale'; got {self.tune!r}.")
        self.tune = {key: _scales(key, self.tune[key]) for key in TUNE_GRIDS if key in self.tune}

    @property
    def loads_by_name(self) -> bool:
        return isinstance(self.model, str)

    @property
    def model_name(self) -> str:
        if self.loads_by_name:
            return self.model
        config = getattr(self.model[0], "config", None)
        return getattr(config, "_name_or_path", None) or type(self.model[0]).__name__

    def plan(self) -> list[RunSpec]:
        """The runs this request makes, in order: every setting once per seed ("base" trains nothing: once).
        Names are unique and readable: "vera-r256", with "-d0.1" only when d_init varies; "lora-r8", with "-a16"
        only when alpha / r varies; "-s1" (the seed) only when there are several seeds."""
        return list(self._plan)

    def tuning_plan(self) -> list[tuple[RunSpec, float]]:
        """(setting at the first seed, learning-rate scale) of every tuning run; [] without `tune`."""
        return list(self._tuning_plan)

    def settings(self) -> list[RunSpec]:
        """The request's settings (one per method and adapter config), each named as its single-seed run."""
        return list(self._settings)

    def _tie_grids(self) -> dict[str, int]:
        """{setting: its grid's size} of every tuned setting whose grid can tie (more than one point)."""
        grids: dict[str, int] = {}
        for spec, _ in self._tuning_plan:
            grids[spec.setting] = grids.get(spec.setting, 0) + 1
        return {setting: n for setting, n in grids.items() if n > 1}

    def tie_runs(self) -> tuple[int, int]:
        """(fewest, most) second-seed runs tuning adds to break near-ties (lab/tune.py): each tuned setting with more
        than one grid point retrains its winner on a second seed, and every point within the seed spread of it too."""
        grids = self._tie_grids()
        return len(grids), sum(grids.values())

    def run_count(self) -> int:
        """The runs the request makes for sure: each setting once per seed, the tuning runs and each tuned
        setting's second-seed run; near-ties can add more, up to `tie_runs()[1]` in all."""
        return len(self._plan) + len(self._tuning_plan) + self.tie_runs()[0]

    def _make_plan(self) -> list[RunSpec]:
        runs = []
        for setting in self._settings:
            for seed in self.seeds[:1] if setting.method == "base" else self.seeds:
                name = setting.name + (f"-s{seed}" if len(self.seeds) > 1 and setting.method != "base" else "")
                runs.append(replace(setting, name=name, seed=seed))
        return runs

    def _make_tuning_plan(self) -> list[tuple[RunSpec, float]]:
        """(setting at the first seed, learning-rate scale) of every tuning run, head-only first (its chosen rate
        becomes the head rate the others' points train with, see `rates`) on its own grid ("head_lr_scale", else
        "lr_scale"); [] without `tune`."""
        if not self.tune:
            return []
        trained = sorted((s for s in self._settings if s.method != "base"), key=lambda s: s.method != "head")
        own = {"head": self.tune.get("head_lr_scale", self.tune["lr_scale"])}
        return [(replace(s, seed=self.seeds[0]), scale) for s in trained
                for scale in own.get(s.method, self.tune["lr_scale"])]

    def _make_settings(self) -> list[RunSpec]:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown or self.methods!r}; choose from {', '.join(METHODS)}.")
        specs = []
        for method in self.methods:
            if method == "vera":
                several_d = len({v.d_init for v in self.vera}) > 1
                specs += [RunSpec(f"vera-r{v.r}" + (f"-d{v.d_init:g}" if several_d else ""), "vera", v)
                          for v in self.vera]
            elif method == "lora":
                several_scales = len({c.scaling for c in self.lora}) > 1
                specs += [RunSpec(f"lora-r{c.r}" + (f"-a{c.alpha:g}" if several_scales else ""), "lora", c)
                          for c in self.lora]
            else:
                specs.append(RunSpec(method, method, None))
        _refuse_repeats(specs)
        return [replace(s, setting=s.name) for s in specs]

    def steps_per_run(self) -> int:
        """Optimizer steps each trained run makes (from an epoch budget: the training split's batches)."""
        if self.train.steps is not None:
            return self.train.steps
        per_step = self.train.batch_size * self.train.grad_accum
        return max(1, math.ceil(self.train.epochs * len(self._data().train) / per_step))

    def time_estimate(self, step_s: dict[str, float]) -> dict:
        """Training time of every planned run, tuning runs included, from measured seconds per step
        (`compare.measure_step_times`, keyed by setting name): a measured setting uses its own time; another is
        interpolated in trainable parameters between the measured settings of its method (the nearest one outside
        their range). Loading, evaluation and "base" (which does not train) are not counted.
        {"total_s", "runs": {name: seconds}, "based_on": words}; tuning runs are named "tune/<setting>-x<scale>", the
        second-seed run each tuned setting makes for sure "tune/<setting>-second-seed" (near-ties can add more)."""
        sizes = {row["run"]: row["trainable"] for row in self.estimate()}
        method_of = {spec.name: spec.method for spec in self.settings()}
        per_step: dict[str, float] = {}
        for spec in self.settings():
            known = sorted((sizes[name], s) for name, s in step_s.items() if method_of.get(name) == spec.method)
            if spec.method != "base" and not known:
                raise ValueError(f"no measured step time for a {spec.method} run; measure one first.")
            per_step[spec.setting] = _interpolate(known, sizes[spec.setting]) if spec.method != "base" else 0.0
        steps, tune_steps = self.steps_per_run(), self.tune_steps or self.steps_per_run()
        runs = {spec.name: steps * per_step[spec.setting] for spec in self.plan()}
        runs.update({f"tune/{spec.setting}-x{scale:g}": tune_steps * per_step[spec.setting]
                     for spec, scale in self.tuning_plan()})
        runs.update({f"tune/{setting}-second-seed": tune_steps * per_step[setting] for setting in self._tie_grids()})
        fewest, most = self.tie_runs()
        tuning = (f", plus {len(self.tuning_plan())} tuning runs of {tune_steps} steps and {fewest} second-seed runs "
                  f"(up to {most} if grid points tie)") if self.tune else ""
        return {"total_s": sum(runs.values()), "runs": runs,
                "based_on": f"{len(self.plan())} runs of {steps} steps{tuning}, x the step time measured on this "
                            f"device for {', '.join(sorted(step_s))}; loading and evaluation not included"}

    def rates(self, spec: RunSpec, scale: float = 1.0, head_scale: float = 1.0) -> tuple[float, float]:
        """(learning rate, head learning rate) of a run. The classifier head trains at one rate in every method of a
        comparison (`head_rate`), so the methods differ in their adapters only: an adapter's tuned `scale` moves its
        own rate, never the head's. Head-only trains nothing but the head: its rate is the head rate × its `scale`.
        Other methods: `lrs` for the method, else train.lr, else the method's default, × `scale`; full fine-tuning
        trains its head with the body, at that one rate."""
        from .train import default_lr  # the trainer loads only when a run needs its rates

        if spec.method == "base":
            return 0.0, 0.0
        if spec.method == "head":
            return self.head_rate(scale), self.head_rate(scale)
        lr = (self.lrs.get(spec.method, self.train.lr) or default_lr(spec.method)[0]) * scale
        return lr, lr if spec.method == "full" else self.head_rate(head_scale)

    def head_rate(self, head_scale: float = 1.0) -> float:
        """The comparison's one classifier-head rate: lrs["head"], else train.head_lr, else the default (DEFAULT_LR's
        head-only rate), × `head_scale`: head-only's tuned scale when tuning chose one (vera_core.lab.tune)."""
        from .train import default_lr

        return (self.lrs.get("head") or self.train.head_lr or default_lr("head")[1]) * head_scale

    def train_config(self, spec: RunSpec, scale: float = 1.0, head_scale: float = 1.0) -> TrainConfig:
        """The run's TrainConfig: the request's, with its own seed and rates (`rates`)."""
        if spec.method == "base":
            return replace(self.train, seed=spec.seed)
        lr, head_lr = self.rates(spec, scale, head_scale)
        return replace(self.train, seed=spec.seed, lr=lr, head_lr=head_lr)

    def model_config(self):
        """The model's architecture, without its weights."""
        return model_config(self.model, self.trust_remote_code) if self.loads_by_name else self.model[0].config

    def base_parameters(self) -> int:
        """Parameters of the base model's body (no task head), counted on the meta device."""
        return count_parameters(meta_model(self.model_config()))["total"]

    def estimate(self) -> list[dict]:
        """Before a run, from shapes alone: per setting (its seeds share it) its trainable parameters (head
        excluded), the share of the base model, the stored adapter bytes, the training-memory estimate (no weights
        are read) and a warning when that estimate exceeds the device's memory."""
        config, total = self.model_config(), self.base_parameters()
        available, where = self._device_memory()
        rows = []
        for spec in self.settings():
            if spec.adapter is not None:
                params = estimate_parameters(config, spec.adapter)
                trainable, stored = params["trainable"], params["stored_bytes"]
            else:
                trainable, stored = (total if spec.method == "full" else 0), None
            memory = estimate_memory(config, spec.adapter or (None if spec.method == "base" else spec.method),
                                     self.train.batch_size, self.train.max_length, quantization=self.quantization,
                                     grad_checkpointing=self.train.grad_checkpointing,
                                     max_grad_norm=self.train.max_grad_norm, prefer=self.train.prefer)
            over = memory["total"] > available
            rows.append({"run": spec.name, "method": spec.method, "trainable": trainable,
                         "% of model": round(100 * trainable / total, 4), "stored_bytes": stored,
                         "memory_estimate": memory,
                         "warning": f"{spec.name}: the memory estimate, {memory['total'] / 2**30:,.1f} GiB, is more than "
                                    f"{where} {available / 2**30:,.1f} GiB; lower the batch size or max_length, or "
                                    "the run may fail." if over else None})
        return rows

    def _device_memory(self) -> tuple[int, str]:
        """(bytes, words) of the memory the runs will train in: the GPU's, or this machine's RAM."""
        device = resolve_device(self.train.device)
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory, f"the GPU's ({device})"
        return psutil.virtual_memory().total, "this machine's"


def _scales(key: str, value) -> list[float]:
    """A tuning grid, checked: a non-empty list of distinct positive numbers."""
    scales = list(value)
    if not scales:
        raise ValueError(f"the tuning grid is empty ({key}); give at least one learning-rate scale, e.g. 0.5,1,2.")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0
           for x in scales):
        raise ValueError(f"learning-rate scales must be positive numbers, got {scales}.")
    if len(set(scales)) != len(scales):
        raise ValueError(f"the tuning grid {scales} repeats a scale; list each once.")
    return [float(x) for x in scales]


def _refuse_repeats(specs: list[RunSpec]) -> None:
    """The same settings twice would train the same run twice: a clear error, before two names clash."""
    seen: dict = {}
    for spec in specs:
        key = (spec.method, repr(spec.adapter))
        if key in seen:
            raise ValueError(f"duplicate settings: {spec.adapter or spec.method} is listed twice; remove the repeat.")
        seen[key] = spec
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs would share a name in {names}; give the configs different r, d_init or alpha "
                         "(run names show only those).")


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    """y at x on the line through sorted (x, y) points; outside them, the nearest point's y."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]

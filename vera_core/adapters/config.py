"""Adapter configurations: VeRA and LoRA, typed, validated on construction and JSON round-trippable.

`target_modules` follows PEFT's semantics:
  None          -> the architecture's default (see DEFAULT_TARGETS)
  list of names -> module-name suffixes matched on a dot boundary ("q_proj" matches "model.layers.0.self_attn.q_proj")
  a string      -> a regex full-matched against the whole module path
  "all-linear"  -> every Linear / Conv1D except the output head
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence, Union

from .checks import finite, positive_int

TargetModules = Union[None, str, list[str], tuple[str, ...]]

# Per-architecture defaults (attention query and value, as in the LoRA and VeRA papers).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
}

ALL_LINEAR = "all-linear"


def _check_dropout(value) -> None:
    finite("dropout", value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {value!r}. Use 0.0 to disable it.")


def _normalise_targets(value: TargetModules) -> TargetModules:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise ValueError("target_modules is an empty string; give module names, a regex or 'all-linear'.")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(
        f"target_modules must be None, a non-empty list of module names, a regex string or 'all-linear'; got {value!r}."
    )


def _normalise_names(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError(f"modules_to_save must be a list of module names such as ['classifier'], got {value!r}.")


# The paper's ablations (VeRA, Tables 6-7), as VeraConfig switches; the first value of each is VeRA itself.
TRAIN_VECTORS = ("both", "d", "b")  # which scaling vectors train: "d" omits b, "b" omits d
PROJECTIONS = ("shared", "unique")  # one (A, B) for every layer, or a pair of its own per layer
PROJECTION_INITS = ("kaiming_uniform", "kaiming_normal", "uniform")  # uniform: U[0, 0.1]
# d's starting value where train_vectors omits a vector: "d" starts d at 0 (b is omitted, so d = 0 keeps the model
# unchanged), "b" holds d at a constant 1 (d is omitted).
_FIXED_D_INIT = {"d": 0.0, "b": 1.0}
_D_INIT_DEFAULT = 0.1


@dataclass
class VeraConfig:
    """VeRA: h = W0 x + b * (B (d * (A x))) with A, B random, frozen and shared; b, d trained per layer.

    The paper's ablations are switches: train_vectors="d" (no b: h = W0 x + B (d * (A x)), d starts at 0) or "b"
    (no d: h = W0 x + b * (B (A x))); projections="unique" (each layer's own pair, drawn from a seed derived from
    projection_seed and the layer's module path); projection_init="kaiming_normal" or "uniform" (U[0, 0.1]).
    With "d" or "b", d's start is fixed (0, resp. 1): d_init must be left out (0.1, the default, reads as left out)
    or give that value.
    """

    r: int = 256  # rank of the shared projections; raising it adds one trainable parameter per layer
    d_init: float = 0.1  # initial value of every d (paper: small values such as 0.1 beat 1.0)
    target_modules: TargetModules = None  # which layers get an adapter (see module docstring)
    projection_seed: int = 0  # seed that regenerates A and B (PEFT's projection_prng_key)
    dropout: float = 0.0  # dropout on the adapter's input
    save_projection: bool = False  # also store A and B in the adapter file (else regenerated from the seed)
    modules_to_save: tuple[str, ...] = ()  # extra modules trained as full copies, e.g. a classifier head
    train_vectors: str = "both"  # which vectors train: "both" (VeRA), "d" (b omitted) or "b" (d omitted)
    projections: str = "shared"  # "shared" (VeRA: one pair for all layers) or "unique" (one pair per layer)
    projection_init: str = "kaiming_uniform"  # A and B's draw: "kaiming_uniform" (PEFT's), "kaiming_normal", "uniform"

    method = "vera"

    def __post_init__(self):
        positive_int("r", self.r)
        for field, allowed in (("train_vectors", TRAIN_VECTORS), ("projections", PROJECTIONS),
                               ("projection_init", PROJECTION_INITS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}, got "
                                 f"{getattr(self, field)!r}.")
        finite("d_init", self.d_init)
        self._check_d_init()
        _check_dropout(self.dropout)
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int) or self.projection_seed < 0:
            raise ValueError(f"projection_seed must be a non-negative integer, got {self.projection_seed!r}.")
        if not isinstance(self.save_projection, bool):
            raise ValueError(f"save_projection must be True or False, got {self.save_projection!r}.")
        if self.save_projection and self.projections == "unique":
            raise ValueError("save_projection=True stores the one shared (A, B); with projections='unique' every "
                             "layer's pair is regenerated from the seed, so leave save_projection False.")
        self.target_modules = _normalise_targets(self.target_modules)
        self.modules_to_save = _normalise_names(self.modules_to_save)

    def _check_d_init(self) -> None:
        fixed = _FIXED_D_INIT.get(self.train_vectors)
        if fixed is None:
            if self.d_init == 0:
                raise ValueError("d_init must not be 0: b starts at 0 too, so neither b nor d would ever get a "
                                 "gradient and the adapter would stay a no-op. Use for example d_init=0.1.")
            return
        if self.d_init == _D_INIT_DEFAULT:
            self.d_init = fixed  # left out: the config (and its file) states the d the layers really start with
        elif self.d_init != fixed:
            why = ("omits b, so d starts at 0 and the model starts unchanged" if self.train_vectors == "d"
                   else "omits d, which stays a constant 1")
            raise ValueError(f"d_init={self.d_init!r} has no effect with train_vectors={self.train_vectors!r}: it "
                             f"{why}. Leave d_init out (or give {fixed}).")

    @property
    def is_default_variant(self) -> bool:
        """Both vectors, one shared pair, Kaiming uniform: VeRA as the paper and PEFT define it."""
        return all(getattr(self, f) == default for f, default in _VARIANT_DEFAULTS.items())

    def to_dict(self) -> dict:
        # The variant fields are written only where they differ from VeRA's, so a default adapter's file stays the
        # bytes every earlier version wrote (and read); config_from_dict fills them back in.
        data = {"method": self.method, **asdict(self), "modules_to_save": list(self.modules_to_save)}
        return {k: v for k, v in data.items() if k not in _VARIANT_DEFAULTS or v != _VARIANT_DEFAULTS[k]}


_VARIANT_DEFAULTS = {"train_vectors": TRAIN_VECTORS[0], "projections": PROJECTIONS[0],
                     "projection_init": PROJECTION_INITS[0]}


@dataclass
class LoraConfig:
    """LoRA: h = W0 x + (alpha / r) B A x with A, B trained per layer (B starts at zero)."""

    r: int = 8  # rank of each layer's A (r x in) and B (out x r)
    alpha: float = 16  # scaling numerator: the update is multiplied by alpha / r
    target_modules: TargetModules = None  # which layers get an adapter (see module docstring)
    dropout: float = 0.0  # dropout on the adapter's input
    modules_to_save: tuple[str, ...] = ()  # extra modules trained as full copies, e.g. a classifier head

    method = "lora"

    def __post_init__(self):
        positive_int("r", self.r)
        finite("alpha", self.alpha)
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}. A common choice is alpha = 2 * r.")
        _check_dropout(self.dropout)
        self.target_modules = _normalise_targets(self.target_modules)
        self.modules_to_save = _normalise_names(self.modules_to_save)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self), "modules_to_save": list(self.modules_to_save)}


AdapterConfig = Union[VeraConfig, LoraConfig]


def vera_grid(r: Sequence[int], d_init: Sequence[float] = (0.1,), **common) -> list[VeraConfig]:
    """One VeraConfig per (r, d_init) pair, r varying slowest: the VeRA list of a sweep. `common`: the other
    VeraConfig fields, shared by every run."""
    return [VeraConfig(r=rank, d_init=d, **common) for rank in _listed(r, "r") for d in _listed(d_init, "d_init")]


def lora_grid(r: Sequence[int], alpha: float | Sequence[float] | None = None, **common) -> list[LoraConfig]:
    """One LoraConfig per rank. alpha: None -> 2r each (the usual choice); one number -> the same alpha for every
    rank; a list -> one alpha per rank, in order."""
    ranks = _listed(r, "r")
    if alpha is None:
        alphas = [2 * rank for rank in ranks]
    elif isinstance(alpha, (int, float)):
        alphas = [alpha] * len(ranks)
    else:
        alphas = _listed(alpha, "alpha")
        if len(alphas) != len(ranks):
            raise ValueError(f"give one LoRA alpha per rank ({len(ranks)} ranks {ranks}, {len(alphas)} alphas "
                             f"{alphas}), a single alpha for all, or none for alpha = 2r.")
    return [LoraConfig(r=rank, alpha=a, **common) for rank, a in zip(ranks, alphas)]


def _listed(values, name: str) -> list:
    """A grid axis as a non-empty list (a bare number is a list of one)."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    if not values:
        raise ValueError(f"the {name} list is empty; give at least one value.")
    return values


def config_from_dict(data: dict) -> AdapterConfig:
    """Rebuild a config written by `to_dict` (unknown keys are an error, so typos in hand-edited files show up)."""
    data = dict(data)
    method = data.pop("method", None)
    cls = {"vera": VeraConfig, "lora": LoraConfig}.get(method)
    if cls is None:
        raise ValueError(f"unknown adapter method {method!r}; expected 'vera' or 'lora'.")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {method} config fields {sorted(unknown)}; known fields: {sorted(known)}.")
    return cls(**data)

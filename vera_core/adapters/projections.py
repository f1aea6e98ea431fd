"""VeRA's shared random projections A (r x max_in) and B (max_out x r), regenerated from one seed.

They are generated exactly as PEFT's `peft.tuners.vera` does, so adapters move between the two: a CPU
`torch.Generator` seeded with the projection seed draws A first, then B, each Kaiming-uniform with gain sqrt(2)
(bound = sqrt(6 / fan_in), fan_in = max_in for A and r for B).

The paper's ablations draw them otherwise (VeraConfig.projection_init): Kaiming normal (std = sqrt(2 / fan_in), the
same gain) or uniform on [0, 0.1]; same generator, same order. With VeraConfig(projections="unique") every adapted
layer gets a pair of its own, (r, in) and (out, r), drawn from `layer_seed(seed, module path)`: the path, not the
layer's position in a list, so a layer's pair does not depend on which other layers an adapter targets.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .fused import InputProjectionCache


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform(-sqrt(6 / fan_in), +sqrt(6 / fan_in)) with fan_in = shape[1], drawn from `generator`."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def kaiming_normal(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Normal(0, sqrt(2 / fan_in)) with fan_in = shape[1]: Kaiming uniform's gain, drawn from `generator`."""
    return torch.empty(shape).normal_(0.0, math.sqrt(2.0 / shape[1]), generator=generator)


def uniform_0_01(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform(0, 0.1), the paper's third initialization."""
    return torch.empty(shape).uniform_(0.0, 0.1, generator=generator)


INITS = {"kaiming_uniform": kaiming_uniform, "kaiming_normal": kaiming_normal, "uniform": uniform_0_01}


def generate_projections(r: int, max_in: int, max_out: int, seed: int,
                         init: str = "kaiming_uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, max_in) then B (max_out, r) from one seeded CPU generator, in fp32."""
    if init not in INITS:
        raise ValueError(f"projection init must be one of {', '.join(INITS)}, got {init!r}.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = INITS[init]((r, max_in), generator)
    B = INITS[init]((max_out, r), generator)
    return A, B


def layer_seed(seed: int, path: str) -> int:
    """The generator seed of the layer at module `path` when every layer has its own pair: 63 bits of
    SHA-256("<seed>:<path>"), so pairs of different layers (and seeds) are independent draws."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fingerprint(A: torch.Tensor, B: torch.Tensor) -> str:
    """SHA-256 of A then B as contiguous fp32 bytes: proves a regenerated pair is the one an adapter was trained with."""
    digest = hashlib.sha256()
    for t in (A, B):
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def layers_fingerprint(pairs: dict[str, "VeraProjections"]) -> str:
    """SHA-256 over every layer's path and its pair's fingerprint, in path order: one value that covers each layer's
    own (A, B) (projections="unique")."""
    digest = hashlib.sha256()
    for path in sorted(pairs):
        digest.update(f"{path}\n{pairs[path].fingerprint()}\n".encode())
    return digest.hexdigest()


class VeraProjections(nn.Module):
    """One frozen (A, B) pair shared by every VeRA layer of a model: a single storage, not per-layer copies.

    The buffers are non-persistent so the model's state dict stays the base model's; the adapter file stores the
    seed and a fingerprint instead (or A and B themselves with save_projection=True).
    """

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, A: torch.Tensor | None = None,
                 B: torch.Tensor | None = None, init: str = "kaiming_uniform"):
        super().__init__()
        self.r, self.max_in, self.max_out, self.seed, self.init = r, max_in, max_out, seed, init
        if A is None or B is None:
            A, B = generate_projections(r, max_in, max_out, seed, init)
        if tuple(A.shape) != (r, max_in) or tuple(B.shape) != (max_out, r):
            raise ValueError(
                f"projection shapes A {tuple(A.shape)} / B {tuple(B.shape)} do not match r={r}, "
                f"max_in={max_in}, max_out={max_out}."
            )
        self.register_buffer("A", A.to(torch.float32), persistent=False)  # (r, max_in)
        self.register_buffer("B", B.to(torch.float32), persistent=False)  # (max_out, r)
        self.input_cache = InputProjectionCache()  # x A_sᵀ of the last input, shared by layers that read it

    def project_input(self, x: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        """u = x A[:, :in]ᵀ (..., r), computed once per input tensor and reused by every layer that reads it."""
        return self.input_cache.project(x, self.A, in_features, dtype)

    def fingerprint(self) -> str:
        """Cached while A and B are unchanged: loading many adapters checks each against the model's pair."""
        key = (self.A.data_ptr(), self.A._version, self.B.data_ptr(), self.B._version)
        if getattr(self, "_fingerprint", (None,))[0] != key:
            self._fingerprint = (key, fingerprint(self.A, self.B))
        return self._fingerprint[1]

    def extra_repr(self) -> str:
        init = "" if self.init == "kaiming_uniform" else f", init={self.init}"
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, seed={self.seed}{init}"

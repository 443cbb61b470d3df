"""The only source of randomness in verakit: seed -> the shared frozen projections A and B.

Every element is a pure function of (seed, matrix id, row, column), computed with the counter-based
Philox4x32-10 generator in integer arithmetic (no torch RNG, no floating-point transcendental functions
from the platform), so that:

* the values are bit-identical on every OS, CPU, thread count and torch version (the tables are always
  generated on the CPU and then copied to the compute device);
* a layer's A (r x d_in) and B (d_out x r) are slices of one conceptually infinite table: adding a
  target module, or an adapter of a lower rank, never changes existing projection values.

The tables hold *unit* values; the fan-in scaling of each distribution depends on the layer's shape and
is a scalar that the layer folds into d (see `Projection.scale`). `docs/format.md` specifies the
algorithm well enough to reimplement it.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch

__all__ = [
    "GENERATOR",
    "philox4x32",
    "unit_table",
    "matrix_ids",
    "distribution_scale",
    "peft_torch_tables",
    "Projection",
    "MAX_PROJECTION_ELEMENTS",
]

GENERATOR = "philox4x32-10/v1"
# Generator names recorded in adapter files, per VeraConfig.projection_kind.
GENERATORS = {"philox4x32-10": GENERATOR, "peft-torch": "peft-torch/v1", "explicit": "explicit"}

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers (Salmon et al., SC'11)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF
# Largest shared pair, in table elements r * (max_in + max_out), that a file's metadata alone may ask for
# (a "peft-torch" pair, an adapter with an embedding: `fileformat`) or that attaching an embedding builds
# (its vocabulary is the table's width). No real model needs more: r=1024 over 2 x 128k-wide layers is ~2.7e8.
MAX_PROJECTION_ELEMENTS = 1 << 28


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: (hi, lo) = divmod(a * b, 2**32) for a 32-bit constant a and int64 tensor b < 2**32.

    Split into 16-bit halves so every intermediate stays below 2**35 and int64 never overflows.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    t = b_lo * a_lo
    mid1 = b_lo * a_hi + (t >> 16)
    mid2 = b_hi * a_lo + (mid1 & 0xFFFF)
    lo = ((mid2 & 0xFFFF) << 16) | (t & 0xFFFF)
    hi = b_hi * a_hi + (mid1 >> 16) + (mid2 >> 16)
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: int, c3: int, key: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semantics: Philox4x32-10(counter=(c0, c1, c2, c3), key=(key & 0xFFFFFFFF, key >> 32)).

    c0, c1: int64 tensors of 32-bit values (broadcastable); c2, c3: 32-bit ints. Returns 4 words.
    Matches the Random123 known-answer vectors (tests/test_projection.py).
    """
    x0, x1 = torch.broadcast_tensors(c0.to(torch.int64), c1.to(torch.int64))
    x2 = torch.full_like(x0, c2 & _MASK32)
    x3 = torch.full_like(x0, c3 & _MASK32)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, x0)
        hi1, lo1 = _mulhilo(_M1, x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


def _ln(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive float64 values from IEEE basic operations only (+ - * /, frexp).

    Platform `log` implementations differ in the last bit; this one is deterministic everywhere.
    Accurate to ~1 ulp: ln(m 2^e) = 2 atanh((m-1)/(m+1)) + e ln2 with m in [sqrt(1/2), sqrt(2)).
    """
    m, e = torch.frexp(x)
    low = m < math.sqrt(0.5)
    m = torch.where(low, m * 2.0, m)
    e = torch.where(low, e - 1, e).to(torch.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    acc = torch.full_like(s, 1.0 / 25.0)
    for k in range(11, -1, -1):  # Horner over 1/(2k+1), k = 11..0; |s| <= 0.172 so 13 terms reach 1e-17
        acc = acc * s2 + 1.0 / (2 * k + 1)
    return 2.0 * s * acc + e * math.log(2.0)


# Acklam's rational approximation of the normal inverse CDF (relative error < 1.2e-9).
_ACK_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
          -3.066479806614716e01, 2.506628277459239e00)
_ACK_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
          -1.328068155288572e01)
_ACK_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
          4.374664141464968e00, 2.938163982698783e00)
_ACK_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)


def _horner(coeffs: tuple[float, ...], x: torch.Tensor, tail: float | None = None) -> torch.Tensor:
    acc = torch.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + c
    if tail is not None:
        acc = acc * x + tail
    return acc


def _normal_icdf(p: torch.Tensor) -> torch.Tensor:
    """Standard normal quantile of float64 p in (0, 1), from basic IEEE operations and sqrt only."""
    p_low = 0.02425
    q = p - 0.5
    r = q * q
    central = _horner(_ACK_A, r) * q / _horner(_ACK_B, r, 1.0)
    tail_p = torch.where(p < 0.5, p, 1.0 - p).clamp_min(1e-300)
    t = torch.sqrt(-2.0 * _ln(tail_p))
    tail = _horner(_ACK_C, t) / _horner(_ACK_D, t, 1.0)
    tail = torch.where(p < 0.5, tail, -tail)
    return torch.where((p >= p_low) & (p <= 1.0 - p_low), central, tail)


@lru_cache(maxsize=16)
def unit_table(seed: int, matrix_id: int, distribution: str, rows: int, cols: int) -> torch.Tensor:
    """Semantics: T[i, j] = unit(seed, matrix_id, i, j), float32 CPU tensor of shape (rows, cols).

    kaiming_uniform: (w >> 8) * 2**-23 - 1 in [-1, 1), w = word j % 4 of Philox(j // 4, i, id_lo, id_hi);
    kaiming_normal:  Acklam quantile of a 53-bit uniform built from words 2(j%2), 2(j%2)+1 of
                     Philox(j // 2, i, id_lo, id_hi), rounded to float32;
    uniform:         (w >> 8) * 2**-24 in [0, 1), w as for kaiming_uniform.
    The key is the 64-bit seed. Cached per process; callers must not modify the result in place.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"projection table needs rows, cols >= 1, got ({rows}, {cols})")
    if rows > _MASK32 or cols > _MASK32:
        raise ValueError(f"projection table of shape ({rows}, {cols}) exceeds the 2**32 counter range")
    per_call = 2 if distribution == "kaiming_normal" else 4
    blocks = -(-cols // per_call)
    c0 = torch.arange(blocks, dtype=torch.int64).unsqueeze(0)  # (1, blocks)
    c1 = torch.arange(rows, dtype=torch.int64).unsqueeze(1)  # (rows, 1)
    words = philox4x32(c0, c1, matrix_id & _MASK32, matrix_id >> 32, seed)
    if distribution == "kaiming_normal":
        pairs = [(words[0], words[1]), (words[2], words[3])]
        # 53-bit uniform in (0, 1): 27 + 26 bits, offset by half a step so 0 and 1 never occur.
        u = [((hi >> 5).double() * 67108864.0 + (lo >> 6).double() + 0.5) * 2.0**-53 for hi, lo in pairs]
        vals = torch.stack([_normal_icdf(x) for x in u], dim=-1).float()  # (rows, blocks, 2)
    else:
        w = torch.stack(words, dim=-1) >> 8  # (rows, blocks, 4), 24-bit integers
        if distribution == "kaiming_uniform":
            vals = w.float() * 2.0**-23 - 1.0
        elif distribution == "uniform":
            vals = w.float() * 2.0**-24
        else:
            raise ValueError(f"unknown projection distribution {distribution!r}")
    return vals.reshape(rows, blocks * per_call)[:, :cols].contiguous()


def matrix_ids(sharing: str, layer_name: str | None = None) -> tuple[int, int]:
    """Matrix ids of (A, B): 0 and 1 when shared; derived from the layer name when unique."""
    if sharing == "shared":
        return 0, 1
    if layer_name is None:
        raise ValueError("unique projections need the layer name")
    ids = []
    for which in ("A", "B"):
        digest = hashlib.sha256(f"verakit/unique/{layer_name}/{which}".encode()).digest()
        ids.append(int.from_bytes(digest[:8], "little"))
    return ids[0], ids[1]


def distribution_scale(distribution: str, fan_in: int) -> float:
    """Factor turning unit table values into the distribution's values for a matrix with `fan_in`."""
    if distribution == "kaiming_uniform":
        return math.sqrt(6.0 / fan_in)  # Kaiming-uniform bound, gain sqrt(2)
    if distribution == "kaiming_normal":
        return math.sqrt(2.0 / fan_in)  # Kaiming-normal std, gain sqrt(2)
    if distribution == "uniform":
        return 0.1  # U[0, 0.1): the paper's ablation, no fan-in dependence
    raise ValueError(f"unknown projection distribution {distribution!r}")


def peft_torch_tables(seed: int, rank: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: PEFT VeRA's shared pair for `projection_prng_key=seed`: A (rank, max_in), B (max_out, rank).

    Reproduces peft/tuners/vera/model.py (`_init_vera_A_vera_B`, `_kaiming_init`): one CPU torch.Generator
    seeded with the key draws A then B with `uniform_(-bound, bound)`, bound = sqrt(3) * sqrt(2) / sqrt(fan_in),
    fan_in = the tensor's column count. The values are only as portable as torch's CPU generator.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((rank, max_in), (max_out, rank)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=gen))
    return out[0], out[1]


class Projection:
    """One frozen (A, B) pair held once per model; layers take views of it.

    Semantics: A = unit_table(seed, a_id)[:rank, :max_in], B = unit_table(seed, b_id)[:max_out, :rank].
    A layer with input width d_in and rank r uses A[:r, :d_in], B[:d_out, :r] and the scalar
    `scale(d_in, r)` = scale_A(fan_in=d_in) * scale_B(fan_in=r). Not an nn.Module on purpose: it must
    never appear in a state_dict or be copied per layer by `model.to()`.

    `kind` is the VeraConfig.projection_kind: "philox4x32-10" for the tables above; "peft-torch" and
    "explicit" projections (`from_tables`, `peft_torch`) hold already-scaled values, so `scale` is 1.
    """

    kind = "philox4x32-10"

    def __init__(
        self, seed: int, distribution: str, rank: int, max_in: int, max_out: int, ids: tuple[int, int] = (0, 1)
    ) -> None:
        self.seed, self.distribution, self.rank = seed, distribution, rank
        self.max_in, self.max_out, self.ids = max_in, max_out, ids
        self.A = unit_table(seed, ids[0], distribution, rank, max_in)  # (R, max_in)
        self.B = unit_table(seed, ids[1], distribution, max_out, rank)  # (max_out, R)
        self._copies: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_tables(cls, A: torch.Tensor, B: torch.Tensor, kind: str = "explicit", seed: int = 0) -> Projection:
        """A projection using the given, already-scaled tables A (R, max_in) and B (max_out, R) as is."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"projection tables need A (R, max_in), B (max_out, R); got {tuple(A.shape)}, {tuple(B.shape)}")
        if kind not in GENERATORS or kind == cls.kind:
            raise ValueError(f"tables given as is need kind 'explicit' or 'peft-torch', got {kind!r}")
        self = cls.__new__(cls)
        self.seed, self.distribution, self.rank = seed, "kaiming_uniform", A.shape[0]
        self.max_in, self.max_out, self.ids = A.shape[1], B.shape[0], (0, 1)
        self.A = A.detach().to("cpu", torch.float32).contiguous()
        self.B = B.detach().to("cpu", torch.float32).contiguous()
        self.kind = kind
        self._copies = {}
        return self

    @classmethod
    def peft_torch(cls, seed: int, rank: int, max_in: int, max_out: int) -> Projection:
        """PEFT's pair for `projection_prng_key=seed` at PEFT's max shapes (see `peft_torch_tables`)."""
        A, B = peft_torch_tables(seed, rank, max_in, max_out)
        return cls.from_tables(A, B, kind="peft-torch", seed=seed)

    def scale(self, d_in: int, r: int) -> float:
        if self.kind != Projection.kind:
            return 1.0  # the tables already hold the distribution's values
        return distribution_scale(self.distribution, d_in) * distribution_scale(self.distribution, r)

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) on `device` in `dtype`, converted once per (device, dtype) and cached."""
        key = (torch.device(device), dtype)
        pair = self._copies.get(key)
        if pair is None:
            pair = (self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype))
            self._copies[key] = pair
        return pair

    def spec(self) -> dict[str, object]:
        return {"generator": GENERATORS[self.kind], "seed": self.seed, "distribution": self.distribution}

"""Dropout that stays cheap inside a ``torch.compile``'d graph on the CPU.

Inductor's CPU code draws each random number of a dropout mask with a scalar Philox call (one 10-round
Philox block per element, three of its four words thrown away), so in the tutorial UNet's compiled bf16 step
the masks of attention and ResBlock dropout cost more than the convolutions' forward pass
(docs/benchmarks.md). Inside a compiled CPU graph :func:`dropout` draws its mask from a counter-based integer
hash of each element's index instead, which inductor fuses and vectorises: the same Bernoulli(1 - p) mask
and 1 / (1 - p) scaling as ``F.dropout``, from another random stream. Everywhere else (eager, CUDA) it is
``F.dropout`` itself; compiled and eager runs already draw different masks (inductor's Philox is not ATen's
Mersenne Twister), and both are fixed functions of the global RNG's state, so a resumed run stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "dropout",
]

# The 32-bit finaliser of MurmurHash3 (Appleyard), in int32 arithmetic that wraps; torch's >> on int32 is an
# arithmetic shift, so each shift is masked to make it the logical one of the finaliser.
_GOLDEN = -1640531535  # 0x9E3779B1 as int32: consecutive indices land far apart before mixing
_M1 = -2048144789  # 0x85EBCA6B
_M2 = -1028477387  # 0xC2B2AE35
_UNIT = 1.0 / (1 << 24)


def _mix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _M1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _M2
    return h ^ ((h >> 16) & 0xFFFF)


def hashed_uniform(seed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) floats (24 random bits each) in the shape and memory layout of ``like``: the hash of each
    element's position in memory and the int32 ``seed`` (a 0-d tensor)."""
    n = like.numel()
    if n >= 1 << 31:
        raise ValueError(f"hashed_uniform indexes elements with int32: {n:,} elements are too many")
    index = torch.arange(n, dtype=torch.int32, device=like.device)
    dense = like.is_contiguous() or (like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last))
    # in ``like``'s own layout, so that a pointwise op on both keeps it (channels-last stays channels-last)
    index = index.as_strided(like.shape, like.stride()) if dense else index.view(like.shape)
    h = _mix(_mix(index * _GOLDEN + seed) + seed)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * _UNIT


def hashed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with probability ``p`` whose mask comes from :func:`hashed_uniform`, seeded from the global RNG."""
    seed = torch.randint(-(1 << 31), (1 << 31) - 1, (), dtype=torch.int32, device=x.device)
    keep = hashed_uniform(seed, x) >= p
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


def _hashed_here(x: torch.Tensor) -> bool:
    """Inside a graph that torch.compile traces for the CPU (``torch._dynamo.is_compiling`` on a torch without
    ``torch.compiler.is_compiling``)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return x.device.type == "cpu" and is_compiling()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``; inside a compiled CPU graph, :func:`hashed_dropout`."""
    if not training or p == 0.0:
        return x
    return hashed_dropout(x, p) if _hashed_here(x) else F.dropout(x, p, training=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)``; inside a compiled CPU graph with
    dropout, SDPA's own maths path (in fp32, as SDPA computes reduced-precision inputs there) with
    :func:`hashed_dropout` on the attention weights."""
    if dropout_p == 0.0 or not _hashed_here(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        return (hashed_dropout(weights, dropout_p) @ v).to(dtype)

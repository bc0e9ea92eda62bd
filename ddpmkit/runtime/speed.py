"""Speed modes, resolved once per run for its device: mixed precision, channels-last, TF32,
``torch.compile`` (with CUDA graphs on a GPU) and the fused Adam.

What each costs in exactness (docs/benchmarks.md): every mode keeps a resumed run bit-identical to an
uninterrupted one on the CPU, because each is a fixed function of the config; fp16 carries its loss
scale in the checkpoint for that. bf16 and fp16 change the numbers against fp32 (within the
tolerances tests/test_speed.py states); TF32 (CUDA only) does too.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ddpmkit.errors import ConfigError
from ddpmkit.validation import AUTO  # noqa: F401  (re-exported: speed modes' own vocabulary)

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context for ``precision`` ('fp32' disables it)."""
    dtype = _DTYPES.get(precision, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision in _DTYPES)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class SpeedModes:
    """The speed settings one run trains and samples with."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    tf32: bool = False
    #: the compiled training step captured in CUDA graphs (torch.compile's "reduce-overhead"); CUDA only
    cuda_graphs: bool = False

    @classmethod
    def for_run(cls, train: Any, device: torch.device) -> SpeedModes:
        """The modes ``train`` (a config's [train] table) asks for on ``device``; a setting left ``"auto"`` (not
        yet measured: ``ddpmkit.training.autotune`` resolves it before a run trains) is its plain default."""
        fused = train.fused_adam if train.fused_adam is not None else default_fused_adam(device)
        return cls(
            precision=train.precision if train.precision != AUTO else "fp32",
            channels_last=bool(train.channels_last) if train.channels_last != AUTO else False,
            compile=bool(train.compile) if train.compile != AUTO else False,
            fused_adam=fused and fused_adam_available(device),
            tf32=train.tf32 and device.type == "cuda",
            cuda_graphs=train.cuda_graphs and device.type == "cuda",
        )

    def train_settings(self) -> dict[str, Any]:
        """The ``[train]`` keys that ask for these modes."""
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "fused_adam": self.fused_adam,
            "tf32": self.tf32,
            "cuda_graphs": self.cuda_graphs,
        }

    def overrides(self) -> list[str]:
        """The same as ``--set`` arguments (``train.precision=bf16`` ...); TF32 and CUDA graphs only when on, so
        that otherwise the config's own setting stands."""
        settings = {k: v for k, v in self.train_settings().items() if k not in ("tf32", "cuda_graphs") or v}
        return [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]

    @property
    def graphed(self) -> bool:
        """Whether the compiled training step runs in CUDA graphs (they replay a compiled graph: compile is needed)."""
        return self.compile and self.cuda_graphs

    def describe(self) -> str:
        parts = [self.precision]
        parts += [
            name
            for name, on in (
                ("channels-last", self.channels_last),
                ("compiled", self.compile),
                ("CUDA graphs", self.graphed),
                ("fused Adam", self.fused_adam),
                ("TF32", self.tf32),
            )
            if on
        ]
        return ", ".join(parts)


def default_fused_adam(device: torch.device) -> bool:
    """Fused Adam where it measured faster: CUDA (one kernel for all parameters). On this project's
    CPU it measured no faster than the default for-each implementation (docs/benchmarks.md)."""
    return device.type == "cuda"


def fused_adam_available(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu", "mps", "xpu")


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, modes: SpeedModes) -> torch.optim.Adam:
    """Adam, fused when ``modes`` says so; its state stays fp32 whatever the precision."""
    if modes.fused_adam:
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr)


def grad_scaler(device: torch.device, modes: SpeedModes) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (whose range underflows small gradients); None otherwise."""
    if modes.precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def set_matmul_precision(device: torch.device, modes: SpeedModes) -> None:
    """TF32 matmuls and convolutions on CUDA when asked (process-wide, as torch keeps it)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = modes.tf32
        torch.backends.cudnn.allow_tf32 = modes.tf32


@contextmanager
def pytorch_default_precision(device: torch.device) -> Iterator[None]:
    """PyTorch's own TF32 defaults for the duration (on CUDA: TF32 convolutions, full fp32 matmuls),
    as a script that never touches these settings runs; the previous settings come back after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class RoutedDenoiser:
    """A denoiser whose forward pass runs through another callable (``torch.compile``'d, or wrapped in
    DistributedDataParallel); everything else (``prediction``, ``state_dict``, ``train``/``eval``) is the
    original module's, so checkpoints keep its own keys."""

    def __init__(self, module: torch.nn.Module, forward: Any) -> None:
        self.module = module
        self._forward = forward

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **conditioning: Any) -> torch.Tensor:
        return self._forward(x_t, t, **conditioning)  # cond= for a conditional denoiser (plugin API 3)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` on this machine (no C++ compiler for a CPU's, no
    Triton for a GPU's); None where it can, or where this torch cannot tell."""
    return _compile_unavailable(device.type)


@functools.cache
def _compile_unavailable(device_type: str) -> str | None:
    try:  # torch's own checks (private helpers): a torch without them lets torch.compile say it
        from torch._dynamo import is_dynamo_supported

        if not is_dynamo_supported():
            return f"torch {torch.__version__} cannot compile on this Python ({sys.version.split()[0]}) or platform"
        if device_type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler
            from torch._inductor.exc import InvalidCxxCompiler

            try:
                get_cpp_compiler()
            except InvalidCxxCompiler:
                return "no working C++ compiler for torch.compile's CPU kernels (install g++ or clang++, or set CXX)"
        elif device_type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "no Triton for torch.compile's GPU kernels (pip install triton)"
    except Exception:
        return None
    return None


def require_compile(device: torch.device, *, kept: bool = False) -> None:
    """Raises ConfigError, saying why and what to do, where ``torch.compile`` cannot run for ``device``; ``kept``: the
    compiled mode is a resumed run's, kept from its start."""
    why = compile_unavailable(device)
    if not why:
        return
    if kept:
        raise ConfigError(
            f"this run started compiled, and a resume keeps its speed modes, but torch.compile cannot "
            f"run here: {why}; or resume uncompiled with --set train.compile=false (exact up to the "
            "compiled graph's own rounding and dropout masks)"
        )
    raise ConfigError(
        f"train.compile is on, but torch.compile cannot run here: {why}; or set train.compile "
        '= false (or "auto", which measures without it)'
    )


def maybe_compiled(module: torch.nn.Module, modes: SpeedModes, forward: Any = None, *, graphs: bool = False) -> Any:
    """``module`` itself, or a :class:`RoutedDenoiser` calling ``forward`` (default: the module),
    compiled when ``modes.compile``, in CUDA graphs with ``graphs`` (the caller's decision: see below).

    CUDA graphs replay a whole compiled forward (and its backward) as one launch, for steps that launching
    kernels from Python bounds (batch 64 on an H100: docs/benchmarks.md). A replay overwrites the previous
    call's outputs, so they are only for callers that use each output before the next call: the training step
    (``graphs=True``), not a sampler that may combine two calls' outputs (classifier-free guidance)."""
    call = forward if forward is not None else module
    if modes.compile:
        require_compile(next(module.parameters(), torch.empty(0)).device)
        call = torch.compile(call, mode="reduce-overhead") if graphs else torch.compile(call)
    return module if call is module else RoutedDenoiser(module, call)

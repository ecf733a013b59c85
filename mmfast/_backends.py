"""Backends: which implementations exist, which can run here (and why not), and the choice for a call.

design.md §2: `reference` (naive, materialises everything), `torch` (chunked PyTorch, any device),
`cpu` (C++ kernels in mmfast._C), `triton` (GPU kernels). The automatic choice is by device
(CUDA → triton, CPU → cpu, else torch); `backend=` or the MMFAST_BACKEND variable overrides it. A
backend asked for by name that cannot run raises; it never falls back silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("reference", "torch", "cpu", "triton")

def _load_extension() -> Optional[str]:
    """Imports mmfast._C (which registers the torch.ops.mmfast.cpu_* kernels); why not, or None."""
    if importlib.util.find_spec("mmfast._C") is None:
        return ("mmfast._C is not built (installed with MMFAST_BUILD_EXT=0, or its build failed); "
                "build it with `pip install --no-build-isolation -e .`")
    try:
        importlib.import_module("mmfast._C")
    except ImportError as exc:  # built against another torch, say
        return f"mmfast._C does not load: {exc}"
    return None


EXT_ERROR: Optional[str] = _load_extension()


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why backend `name` cannot run on `device` (any device when None), or None if it can."""
    if name in ("reference", "torch"):
        return None
    if name == "cpu":
        if EXT_ERROR is not None:
            return EXT_ERROR
        if device is not None and device.type != "cpu":
            return f"it runs on CPU tensors, got tensors on {device}"
        return None
    if name == "triton":
        return _triton_reason(device)
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def _triton_reason(device: Optional[torch.device]) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} has no torch.library.triton_op (torch >= 2.6 has)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is None:
        return None if torch.cuda.is_available() or interpret else (
            "no CUDA device (TRITON_INTERPRET=1 runs it on CPU tensors, slowly, for tests)")
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return None
    return f"it runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on {device}"


def select(name: Optional[str], device: torch.device) -> str:
    """The backend to run for tensors on `device`: `name` if given, else $MMFAST_BACKEND, else by device."""
    if name is None:
        name = os.environ.get("MMFAST_BACKEND") or None
    if name is None:
        preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "torch"
        return preferred if unavailable_reason(preferred, device) is None else "torch"
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run: {reason}")
    return name


SECOND_ORDER = ("second-order gradients (backward through a gradient taken with create_graph=True) are not "
                "supported by {}, whose gradients are first-order only")


def first_order_only(backward_op, family: str) -> None:
    """Registers a backward op's own gradient as this clear error. Without it, backward through its
    output fails in torch's internal terms."""
    def refuse(ctx, *grads):
        raise RuntimeError(SECOND_ORDER.format(family))

    backward_op.register_autograd(refuse)


def no_autocast(t: torch.Tensor):
    """The op bodies compute in fp32 by design; an enclosing autocast region must not lower their
    GEMMs (a forward's statistics and its backward's recomputed logits would then disagree)."""
    return torch.autocast(t.device.type, enabled=False)

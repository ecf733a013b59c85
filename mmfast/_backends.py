"""Backends: which implementations exist, which can run here (and why not), and the choice for a call.

design.md §2: `reference` (naive, materialises everything), `torch` (chunked PyTorch, any device),
`cpu` (C++ kernels in mmfast._C), `triton` (Triton GPU kernels), `cuda` (CUDA C++ kernels in
libmmfast_cuda.so, mmfast/_cuda.py). The automatic choice is by device (CUDA → cuda when built and
loadable, else triton; CPU → cpu; else torch); `backend=` or the MMFAST_BACKEND variable overrides
it. A backend asked for by name that cannot run raises; it never falls back silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")

def _load_extension() -> Optional[str]:
    """Imports mmfast._C (which registers the torch.ops.mmfast.cpu_* kernels); why not, or None."""
    if importlib.util.find_spec("mmfast._C") is None:
        return ("mmfast._C is not built (installed with MMFAST_BUILD_EXT=0, or its build failed); "
                "build it with `pip install --no-build-isolation -e .`")
    try:
        from mmfast._build_info import TORCH_VERSION as built  # written by setup.py beside _C
    except ImportError:  # a build from before the record existed
        built = None
    if built is not None and _minor(built) != _minor(torch.__version__):
        return (f"mmfast._C was built against torch {built}, this is torch {torch.__version__}: it loads only with "
                f"the torch minor version it was compiled against; rebuild mmfast with this torch installed "
                f"(pip install --no-build-isolation -e ., or python -m build --wheel --no-isolation)")
    try:
        importlib.import_module("mmfast._C")
    except ImportError as exc:  # built against another torch, say
        return f"mmfast._C does not load: {exc}"
    return None


def _minor(version: str) -> list[str]:
    """"2.13.0+cpu" → ["2", "13"]."""
    return version.split("+")[0].split(".")[:2]


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
    if name == "cuda":
        from mmfast import _cuda

        return _cuda.unavailable_reason(device)
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
        preferred = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
        return next((p for p in preferred if unavailable_reason(p, device) is None), "torch")
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run: {reason}")
    return name


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch runs CUDA fp32 matmuls in TF32, on torch 2.4 and later.

    torch >= 2.9 has torch.backends.cuda.matmul.fp32_precision ("ieee", "tf32", or "none": inherit
    the generic torch.backends.fp32_precision), and there torch.get_float32_matmul_precision()
    raises once a user has set the new API; so the new settings are read first and the old one only
    where both say "none" (or do not exist, before 2.9)."""
    for setting in (getattr(torch.backends.cuda.matmul, "fp32_precision", "none"),
                    getattr(torch.backends, "fp32_precision", "none")):
        if setting != "none":
            return setting == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


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

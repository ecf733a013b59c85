"""The `cuda` backend's library: kernels/*.cu built by nvcc into mmfast/libmmfast_cuda.so.

It is a plain C library (raw pointers, sizes, the device index and a cudaStream_t; cudart linked
statically), loaded here with ctypes. Nothing of torch is linked into it, so one build loads on any
CUDA build of torch, and a CPU-only torch never loads it: unavailable_reason answers from torch's own
view of the machine first. Launchers are called through `function`, which passes tensors as pointers
and torch's current stream, so the kernels order with torch's work (and are captured by CUDA graphs).
Outputs and workspaces are allocated by the callers with torch (its caching allocator); the library
never allocates device memory.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

LIBRARY = Path(__file__).with_name("libmmfast_cuda.so")
ABI = 1  # kernels/library.cu's MMFAST_CUDA_ABI

# Element types, as kernels/common.cuh's Dtype.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Argument kinds of `function`'s signatures.
PTR, I64, I32, F32, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_double


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(the library, None), or (None, why it does not load)."""
    if not LIBRARY.exists():
        return None, ("mmfast was built without its CUDA kernels (nvcc was not found at build time, or "
                      "MMFAST_BUILD_CUDA=0); rebuild with nvcc on PATH")
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as exc:
        return None, f"{LIBRARY.name} does not load: {exc}"
    lib.mmfast_cuda_abi.restype = ctypes.c_int
    if lib.mmfast_cuda_abi() != ABI:
        return None, f"{LIBRARY.name} has ABI {lib.mmfast_cuda_abi()}, this mmfast wants {ABI}: rebuild it"
    lib.mmfast_cuda_archs.restype = ctypes.c_char_p
    lib.mmfast_cuda_error_string.restype = ctypes.c_char_p
    lib.mmfast_cuda_error_string.argtypes = [ctypes.c_int]
    lib.mmfast_cuda_probe.argtypes = [ctypes.c_int]
    return lib, None


def built_archs() -> Optional[str]:
    """The architectures the library holds code for ("80;90a"), or None when it is not built/loadable."""
    lib, _ = _load() if torch.version.cuda is not None else (None, None)
    if lib is None:
        return None
    return lib.mmfast_cuda_archs().decode()


@functools.lru_cache(maxsize=None)
def _probe(index: int) -> Optional[str]:
    lib, _ = _load()
    code = lib.mmfast_cuda_probe(index)
    if code == 0:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"its kernels do not run on cuda:{index} (sm_{major}{minor}; built for {built_archs()}): "
            f"{lib.mmfast_cuda_error_string(code).decode()}; rebuild with MMFAST_CUDA_ARCHS including {major}{minor}")


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the cuda backend cannot run on `device` (any CUDA device when None), or None if it can."""
    if device is not None and device.type != "cuda":
        return f"it runs on CUDA tensors, got tensors on {device}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device"
    lib, reason = _load()
    if lib is None:
        return reason
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _probe(index)


def _argument(value, kind):
    if kind is PTR:
        return None if value is None else ctypes.c_void_p(value.data_ptr())
    return kind(value)


def function(name: str, *kinds) -> Callable[..., None]:
    """The launcher `name` (kernels/*.cu: `int name(int device, cudaStream_t stream, ...)`), as
    f(tensor, *args): runs on tensor's device and torch's current stream there; args are converted by
    `kinds` (PTR: a tensor or None, I64/I32: ints, F32/F64: floats). A nonzero status raises."""
    @functools.lru_cache(maxsize=None)
    def resolve():
        lib, reason = _load()
        if lib is None:
            raise RuntimeError(f"backend='cuda' cannot run: {reason}")
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, *kinds]
        fn.restype = ctypes.c_int
        return lib, fn

    def call(like: Tensor, *args) -> None:
        if len(args) != len(kinds):
            raise TypeError(f"{name} takes {len(kinds)} arguments after the tensor, got {len(args)}")
        lib, fn = resolve()
        device = like.device
        stream = torch.cuda.current_stream(device).cuda_stream
        code = fn(device.index, stream, *(_argument(a, k) for a, k in zip(args, kinds)))
        if code != 0:
            raise RuntimeError(f"mmfast cuda kernel {name} failed: {lib.mmfast_cuda_error_string(code).decode()} "
                               f"(CUDA error {code})")

    call.__name__ = name
    call.kinds = kinds  # read by tests/test_cuda_compile.py against the C definition
    return call


def dtype_code(t: Tensor) -> int:
    """t's element type as kernels/common.cuh's Dtype; a TypeError for another dtype."""
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the cuda backend takes float32, float16 or bfloat16 tensors, got {t.dtype}") from None

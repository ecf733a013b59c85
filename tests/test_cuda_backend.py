"""The cuda backend's plumbing on a machine without a GPU: how it is chosen and refused, that a CPU
torch never loads the library, and that the built library loads and answers without a driver."""
from __future__ import annotations

import ctypes
import re
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import _backends, _cuda


def test_named_cuda_backend_on_cpu_tensors_says_why():
    a = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run: "):
        mmfast.clip_loss(a, a, 1.0, backend="cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")
def test_cpu_torch_never_loads_the_library():
    """Asking about the cuda backend (select, info, unavailable_reason) on a CPU-only torch answers
    from torch alone: the library is not opened (run in a fresh process, so nothing else opened it)."""
    code = ("import torch, mmfast\nfrom mmfast import _backends, _cuda\n"
            "_backends.select(None, torch.device('cpu')); _backends.unavailable_reason('cuda')\n"
            "mmfast.clip_loss(torch.randn(3, 2), torch.randn(3, 2), 1.0)\n"
            "from mmfast.__main__ import info; info()\n"
            "maps = open('/proc/self/maps').read()\n"
            "assert 'libmmfast_cuda' not in maps, 'the CUDA library was loaded'\n"
            "assert _cuda._load.cache_info().currsize == 0\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cuda       unavailable: torch" in proc.stdout


def test_automatic_choice_prefers_cuda_then_triton(monkeypatch):
    cuda = torch.device("cuda", 0)
    available = {"cuda", "triton", "torch"}
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    monkeypatch.setattr(_backends, "unavailable_reason", lambda name, device=None: None if name in available else "no")
    assert _backends.select(None, cuda) == "cuda"
    available.discard("cuda")
    assert _backends.select(None, cuda) == "triton"
    available.discard("triton")
    assert _backends.select(None, cuda) == "torch"
    assert _backends.select(None, torch.device("meta")) == "torch"


def test_missing_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(_cuda, "LIBRARY", tmp_path / "libmmfast_cuda.so")
    _cuda._load.cache_clear()
    try:
        lib, reason = _cuda._load()
        assert lib is None and "built without its CUDA kernels" in reason
        launcher = _cuda.function("mmfast_nothing", _cuda.PTR)
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run: mmfast was built without"):
            launcher(torch.empty(1), None)
    finally:
        _cuda._load.cache_clear()


def test_dtype_code_names_the_dtype():
    assert [_cuda.dtype_code(torch.empty(0, dtype=t)) for t in (torch.float32, torch.float16, torch.bfloat16)] == [0, 1, 2]
    with pytest.raises(TypeError, match="torch.float64"):
        _cuda.dtype_code(torch.empty(0, dtype=torch.float64))


@pytest.mark.skipif(not _cuda.LIBRARY.exists(), reason="libmmfast_cuda.so is not built (no nvcc at build time)")
def test_library_loads_and_answers_without_a_driver():
    """The library links cudart statically and needs only the driver at run time: without one it
    still loads, reports its ABI and architectures, and its probe returns an error code, not a crash."""
    lib = ctypes.CDLL(str(_cuda.LIBRARY))
    lib.mmfast_cuda_archs.restype = ctypes.c_char_p
    lib.mmfast_cuda_error_string.restype = ctypes.c_char_p
    assert lib.mmfast_cuda_abi() == _cuda.ABI
    assert re.fullmatch(r"\d{2,3}a?(;\d{2,3}a?)*", lib.mmfast_cuda_archs().decode())  # "80;90a" by default
    if not torch.cuda.is_available():
        code = lib.mmfast_cuda_probe(0)
        assert code != 0 and lib.mmfast_cuda_error_string(code)


def test_extension_built_for_another_torch_says_so(monkeypatch):
    """mmfast._C is bound to the torch it was compiled against: with another minor version installed
    the cpu backend is unavailable with that reason (not an undefined-symbol error)."""
    import types

    monkeypatch.setitem(sys.modules, "mmfast._build_info", types.SimpleNamespace(TORCH_VERSION="2.1.0+cpu"))
    reason = _backends._load_extension()
    if reason is not None and "not built" in reason:
        pytest.skip(reason)
    assert reason is not None and "built against torch 2.1.0+cpu" in reason and torch.__version__ in reason

"""Peers for side-by-side benchmarks, loaded if installed (none is a dependency of mmfast)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def open_clip_loss():
    """open_clip's loss.py on its own (the open_clip package itself imports torchvision), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module

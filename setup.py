"""Builds mmfast; the compiled extension mmfast._C comes from CMakeLists.txt.

    pip install --no-build-isolation -e .      # with the extension (needs torch, cmake, ninja)
    MMFAST_BUILD_EXT=0 pip install -e .        # pure Python: the torch backend serves
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures CMakeLists.txt against the installed torch and builds it with ninja."""

    def build_extension(self, ext):
        try:
            import torch.utils
        except ImportError:
            sys.exit("mmfast: building mmfast._C needs torch installed first; install with "
                     "`pip install --no-build-isolation -e .`, or set MMFAST_BUILD_EXT=0 for pure Python")

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MMFAST_BUILD_TYPE', 'Release')}",
        ]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


build_ext_modules = os.environ.get("MMFAST_BUILD_EXT", "1") != "0"

setup(
    name="mmfast",
    version="0.1.0",
    description="Fused kernels for multimodal training: contrastive losses, similarity top-k, masked-LM softmax",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmfast", "mmfast.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["tqdm", "matplotlib", "Pillow"],  # progress bars, curves.png, image files
        "dev": ["pytest", "hypothesis", "cmake", "ninja"],
    },
    ext_modules=[CMakeExtension("mmfast._C")] if build_ext_modules else [],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["mmfast=mmfast.__main__:main"]},
    zip_safe=False,
)

"""Build of divebatch's C++ CPU operators (``divebatch._C``); metadata lives in pyproject.toml.

Build with ``pip install --no-build-isolation -e .`` (or without ``-e``): torch must be the one
already installed, never a copy pulled into an isolated build environment (DESIGN §5).
Without this build the operators are JIT-compiled on first import (``divebatch._build``).
"""

from pathlib import Path

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # an isolated build environment: it has no (or the wrong) torch
    raise SystemExit(
        "divebatch's C++ extension compiles against the torch already installed: install torch==2.13.0 "
        "first, then run `pip install --no-build-isolation .` (or `-e .`)."
    ) from exc

ROOT = Path(__file__).resolve().parent
# at::parallel_for is serial unless the extension is both compiled and linked with OpenMP.
OPENMP = ["-fopenmp"]
# The recurrent cells' loops pick between two computed values per element; GCC vectorises that only
# when it may assume floating-point ops do not trap (PyTorch builds with it too; no value changes).
NO_TRAPS = ["-fno-trapping-math"]

packages = ["divebatch", "divebatch.layers"]
package_dir = {}
# kernels/ (the Triton code) ships as divebatch._kernels; a checkout without it still builds.
if (ROOT / "kernels" / "__init__.py").is_file():
    packages.append("divebatch._kernels")
    package_dir["divebatch._kernels"] = "kernels"

ext = CppExtension(
    name="divebatch._C",
    sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
    include_dirs=[str(ROOT / "csrc")],
    extra_compile_args=["-O3", "-g0", *NO_TRAPS, *OPENMP],  # -g0: Python's default -g makes a 7 MB .so
    extra_link_args=OPENMP,
)

readme = ROOT / "README.md"
long_description = readme.read_text(encoding="utf-8") if readme.is_file() else ""

setup(
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=packages,
    package_dir=package_dir,
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)

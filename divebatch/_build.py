"""Load the C++ CPU kernels of the ``divebatch::*`` operators.

Order of attempts (``load_cpu_extension``):

1. ``divebatch._C``, the ahead-of-time build (``pip install --no-build-isolation -e .``);
2. a JIT build of ``csrc/*.cpp`` with ``torch.utils.cpp_extension.load``, cached in torch's
   extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so
   only the first import pays for the compile; skipped when ``DIVEBATCH_NO_JIT=1``;
3. otherwise one :class:`CppExtensionWarning`, and the PyTorch reference keeps serving CPU tensors
   (it is registered for every device in ``divebatch.ops``).

Loading the shared library is all it takes: its ``TORCH_LIBRARY_IMPL(divebatch, CPU, m)`` block
registers the kernels with the dispatcher. Nothing here touches CUDA.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

#: The C++ sources, found relative to the package (a source checkout or an editable install).
CSRC = Path(__file__).resolve().parent.parent / "csrc"
#: The Triton kernels in a source checkout (installed as ``divebatch._kernels``).
KERNELS = Path(__file__).resolve().parent.parent / "kernels"
#: Module name of the JIT build (the ahead-of-time one is ``divebatch._C``).
JIT_NAME = "divebatch_C"
#: at::parallel_for is serial unless both compiled and linked with OpenMP.
CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]  # (as setup.py: see there)
LDFLAGS = ["-fopenmp"]

_FIX_BUILD = ("Fix: run `pip install --no-build-isolation -e .` in the divebatch checkout (needs a C++ "
              "compiler, g++ or clang++, with OpenMP)")
_FIX_JIT = "or unset DIVEBATCH_NO_JIT to build on first import (also needs ninja)"


class CppExtensionWarning(UserWarning):
    """The C++ CPU kernels could not be loaded; the PyTorch reference runs instead."""


_module: ModuleType | None = None
_source: str | None = None  # "aot", "jit" or None
_failed = False


def extension() -> ModuleType | None:
    """The loaded extension module (``build_info()``, ``num_threads()``), or None."""
    return _module


def source() -> str | None:
    """How the kernels were loaded: ``"aot"`` (``divebatch._C``), ``"jit"``, or None if not at all."""
    return _source


def load_file_package(name: str, init: Path) -> ModuleType:
    """Import the package whose ``__init__.py`` is ``init`` under the module name ``name``
    (its relative imports resolve inside that folder)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_kernels() -> ModuleType:
    """``divebatch._kernels``: the installed package or, in a checkout run without ``pip install``
    (e.g. a GPU machine given the source tree), ``kernels/`` of that checkout under the same name.
    Raises ImportError when neither imports (e.g. no triton)."""
    import importlib

    name = f"{__package__}._kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name or not (KERNELS / "__init__.py").is_file():
            raise
    return load_file_package(name, KERNELS / "__init__.py")


def _jit_build() -> ModuleType:
    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {CSRC} (an install without csrc/)")
    from torch.utils import cpp_extension  # deferred: slow to import, needed only here

    return cpp_extension.load(
        name=JIT_NAME,
        sources=sources,
        extra_include_paths=[str(CSRC)],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        verbose=False,
    )


def _short(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:300] + "\n...\n" + text[-(limit - 300):]


def foreign_builds(package_dir: Path) -> list[str]:
    """The ahead-of-time builds in ``package_dir`` (``_C.*.so``/``.pyd``) that this interpreter cannot
    import: compiled for another Python (``_C.cpython-311-...so`` under Python 3.12), e.g. a tree
    built on one machine and run on another. Python then reports only "cannot import name '_C'"."""
    import importlib.machinery

    return sorted(path.name for path in Path(package_dir).glob("_C.*")
                  if path.suffix in (".so", ".pyd")
                  and not any(path.name == "_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES))


def load_cpu_extension() -> bool:
    """Load the C++ CPU kernels; True if they are registered, False (with one warning) if not.

    Safe to call more than once: later calls return the first result without retrying.
    """
    global _module, _source, _failed
    if _source is not None or _failed:
        return _source is not None
    try:
        from . import _C  # the ahead-of-time build

        _module, _source = _C, "aot"
        return True
    except ModuleNotFoundError:
        aot_problem = ""
    except ImportError as exc:  # built, but not loadable (e.g. against another torch): say so
        foreign = foreign_builds(Path(__file__).resolve().parent)
        if foreign:
            import importlib.machinery

            aot_problem = (f"; {', '.join(foreign)} was built for another Python (this one loads "
                           f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}): rebuild it with this interpreter")
        else:
            aot_problem = f"; divebatch._C exists but does not load: {_short(exc, 500)}"
    if os.environ.get("DIVEBATCH_NO_JIT", "") == "1":
        reason = "divebatch._C is not built and DIVEBATCH_NO_JIT=1 disables the JIT build"
        fix = f"{_FIX_BUILD}, {_FIX_JIT}."
    else:
        fix = f"{_FIX_BUILD}; the JIT build also needs ninja (`pip install ninja`)."
        try:
            _module, _source = _jit_build(), "jit"
            return True
        except Exception as exc:  # noqa: BLE001 - any build failure means "fall back", never crash import
            reason = f"the JIT build of {CSRC} failed:\n{_short(exc)}"
    _failed = True
    warnings.warn(
        f"divebatch: the C++ CPU operators are unavailable ({reason}{aot_problem}). The PyTorch "
        f"reference implementation runs instead (correct, but slower). {fix}",
        CppExtensionWarning,
        stacklevel=2,
    )
    return False

"""Triton kernels of the ``divebatch::*`` operators (installed as ``divebatch._kernels``).

One file per operator (``_<op>_kernel`` + the ``<op>_triton`` wrapper that checks, allocates and
launches); ``register_cuda(lib)`` makes the wrappers the CUDA implementation of the operators
declared in ``divebatch.ops``. Importing this package never queries CUDA; with
``TRITON_INTERPRET=1`` set before import the same wrappers run on CPU tensors (tests).
"""

from __future__ import annotations

from ._common import INTERPRET
from .embedding_norm import embedding_norm_triton
from .ghost_norm import ghost_norm_triton
from .instantiate_norm import instantiate_norm_triton
from .outer_norm import outer_norm_triton
from .recurrent_scan import recurrent_scan_backward_triton, recurrent_scan_triton

__all__ = [
    "INTERPRET",
    "register_cuda",
    "ghost_norm_triton",
    "instantiate_norm_triton",
    "outer_norm_triton",
    "embedding_norm_triton",
    "recurrent_scan_triton",
    "recurrent_scan_backward_triton",
]

#: operator name -> Triton implementation, registered for the CUDA dispatch key.
TRITON_OPS = {
    "ghost_norm": ghost_norm_triton,
    "instantiate_norm": instantiate_norm_triton,
    "outer_norm": outer_norm_triton,
    "embedding_norm": embedding_norm_triton,
    "recurrent_scan": recurrent_scan_triton,
    "recurrent_scan_backward": recurrent_scan_backward_triton,
}


def register_cuda(lib) -> None:
    """Register every ``<op>_triton`` as the ``CUDA`` kernel of ``lib``'s operator of that name."""
    for name, fn in TRITON_OPS.items():
        lib.impl(name, fn, "CUDA")

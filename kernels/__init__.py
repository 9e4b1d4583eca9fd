"""Triton kernels of the ``divebatch::*`` operators (installed as ``divebatch._kernels``).

One file per operator (``_<op>_kernel`` + the ``<op>_triton`` wrapper that checks, allocates and
launches); ``register_cuda(lib)`` makes the wrappers the CUDA implementation of the operators
declared in ``divebatch.ops``. Importing this package never queries CUDA; with
``TRITON_INTERPRET=1`` set before import the same wrappers run on CPU tensors (tests).
"""

from __future__ import annotations

from ._common import INTERPRET, scans_enabled, unverified_configs_enabled
from .affine_norm_grads import affine_norm_grads_triton
from .channel_norm_grads import channel_norm_grads_triton
from .embedding_norm import embedding_norm_triton
from .ghost_norm import conv_ghost_norm_triton, ghost_norm_triton
from .group_norm_grads import group_norm_grads_triton
from .instantiate_norm import conv_instantiate_norm_triton, instantiate_norm_triton
from .outer_norm import outer_norm_triton
from .recurrent_scan import recurrent_scan_backward_triton, recurrent_scan_triton

__all__ = [
    "INTERPRET",
    "UNVERIFIED_ON_GPU",
    "register_cuda",
    "scans_enabled",
    "unverified_configs_enabled",
    "ghost_norm_triton",
    "instantiate_norm_triton",
    "conv_instantiate_norm_triton",
    "conv_ghost_norm_triton",
    "outer_norm_triton",
    "embedding_norm_triton",
    "affine_norm_grads_triton",
    "group_norm_grads_triton",
    "channel_norm_grads_triton",
    "recurrent_scan_triton",
    "recurrent_scan_backward_triton",
]

#: operator name -> Triton implementation, registered for the CUDA dispatch key.
TRITON_OPS = {
    "ghost_norm": ghost_norm_triton,
    "instantiate_norm": instantiate_norm_triton,
    "conv_instantiate_norm": conv_instantiate_norm_triton,
    "conv_ghost_norm": conv_ghost_norm_triton,
    "outer_norm": outer_norm_triton,
    "embedding_norm": embedding_norm_triton,
    "affine_norm_grads": affine_norm_grads_triton,
    "group_norm_grads": group_norm_grads_triton,
    "channel_norm_grads": channel_norm_grads_triton,
    "recurrent_scan": recurrent_scan_triton,
    "recurrent_scan_backward": recurrent_scan_backward_triton,
}


#: Operators whose kernels are not the CUDA implementation unless ``DIVEBATCH_TRITON_SCANS=1``:
#: on an H200 (triton 3.6, bench/results/gpu/) the recurrent scans gave wrong results, since traced
#: to the autotuner timing them on the state they carry (fixed in ``recurrent_scan.py``, reproduced
#: and tested under the interpreter). Their CUDA dispatch runs the PyTorch reference (exact, its
#: per-step GEMMs on the GPU) until a GPU run confirms the fix (the GPU check's scan shards and
#: ``bench/gpu/diagnose_scan.py``).
UNVERIFIED_ON_GPU = ("recurrent_scan", "recurrent_scan_backward")


def register_cuda(lib, wrap=None) -> None:
    """Register every ``<op>_triton`` as the ``CUDA`` kernel of ``lib``'s operator of that name,
    except those of ``UNVERIFIED_ON_GPU`` unless ``scans_enabled()``; ``wrap(name, fn)``, if given,
    is registered in ``fn``'s place (divebatch wraps them in its first-call check against the
    reference, ``divebatch._selfcheck.checked``)."""
    for name, fn in TRITON_OPS.items():
        if name in UNVERIFIED_ON_GPU and not scans_enabled():
            continue
        lib.impl(name, wrap(name, fn) if wrap is not None else fn, "CUDA")

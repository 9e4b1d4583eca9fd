"""Cost model for the linear-family routes (Linear, and Conv after unfolding).

For a layer input ``A [B, T, d]`` and output grad ``G [B, T, p]`` the per-sample weight
gradient ``G_b^T A_b`` has squared norm computable three ways:

* ``outer`` (T = 1): ``||a_b||^2 ||g_b||^2`` -- ``2B(d + p)`` flops, no buffer;
* ``ghost``: ``<A_b A_b^T, G_b G_b^T>`` over upper-triangular tile pairs --
  about ``B T^2 (d + p)`` flops (half of two full Grams), a tile pair of buffer per thread;
* ``instantiate``: form ``G_b^T A_b`` -- ``2 B T d p`` flops, a ``p x d`` buffer per thread.

The cheaper in flops wins unless its buffer exceeds ``MAX_EXTRA_BYTES``. The buffers are the C++
kernels' (per CPU thread); on CUDA, where the Triton kernels run (``triton_kernels``), tiles stay
in registers, the buffers are ghost's ``[B, p]`` column sums and instantiate's ``[p, d]`` sum, and
the bound is ``CUDA_MAX_EXTRA_BYTES`` (``max_extra_bytes``).
"""

from __future__ import annotations

import functools
import os

import torch

from .base import RoutePlan

def _megabytes_from_env(name: str, default: str) -> float:
    """Bytes from the environment variable ``name`` given in MiB (``default`` where unset)."""
    text = os.environ.get(name, default)
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not mib >= 0 or mib == float("inf"):
        raise ValueError(f"{name}={text!r} is not a size in MiB: set it to a number >= 0 (default {default}) "
                         "or unset it")
    return mib * 2**20


#: Largest temporary buffer a route may allocate (bytes); override with DIVEBATCH_MAX_EXTRA_MB.
MAX_EXTRA_BYTES = _megabytes_from_env("DIVEBATCH_MAX_EXTRA_MB", "8")

#: On CUDA, where the Triton kernels run, the largest temporary buffer a route may allocate
#: (bytes; override with DIVEBATCH_CUDA_MAX_EXTRA_MB): ``MAX_EXTRA_BYTES`` bounds the C++ kernels'
#: per-thread buffers and chunks on a CPU, and on a GPU it would cost launches and flops instead of
#: memory: chunks of unfolded patches each cost an unfold, a kernel and sums (under 8 MiB a
#: ResNet-18 at 224 x 224, batch 64, took them one to nine samples at a time, hundreds of launches
#: a layer), and the instantiate route's float32 ``[p, d]`` sum over 8 MiB would leave long
#: sequences to the ghost route at up to twice its flops.
CUDA_MAX_EXTRA_BYTES = _megabytes_from_env("DIVEBATCH_CUDA_MAX_EXTRA_MB", "256")

_GHOST_TILE = 64


def triton_kernels(device_type: str) -> bool:
    """Whether the operators run their Triton kernels for tensors of ``device_type`` (CUDA, where
    Triton serves; ``DIVEBATCH_BACKEND`` may force another implementation)."""
    if device_type != "cuda":  # (asked on every call of every layer: no import on the CPU path)
        return False
    from .. import ops

    return ops.triton_serves(torch.device("cuda"))


def max_extra_bytes(device_type: str) -> float:
    """Largest temporary buffer (bytes) of the linear routes and of chunks of unfolded patches on
    ``device_type``: ``MAX_EXTRA_BYTES``, or on CUDA with the Triton kernels the larger
    ``CUDA_MAX_EXTRA_BYTES``."""
    return max(MAX_EXTRA_BYTES, CUDA_MAX_EXTRA_BYTES) if triton_kernels(device_type) else MAX_EXTRA_BYTES


def linear_route(B: int, T: int, d: int, p: int, force: str | None = None, device_type: str = "cpu") -> RoutePlan:
    """Pick ``outer``, ``ghost`` or ``instantiate`` for ``A [B,T,d]``, ``G [B,T,p]`` on ``device_type``.

    ``force`` (``"ghost"`` or ``"instantiate"``) overrides the choice for tests and benchmarks.
    """
    shape = f"B={B} T={T} d={d} p={p}"
    if T == 1 and force is None:
        return RoutePlan("outer", shape, 2.0 * B * (d + p), 0.0)
    costs = {"ghost": float(B) * T * T * (d + p) + 2.0 * B * T * T, "instantiate": 2.0 * B * T * d * p}
    if triton_kernels(device_type):
        memory = {"ghost": 4.0 * B * p, "instantiate": 4.0 * p * d}
    else:
        threads = torch.get_num_threads()
        tile = min(T, _GHOST_TILE)
        memory = {"ghost": 2.0 * tile * tile * 4 * threads, "instantiate": float(p) * d * 4 * (threads + 1)}
    if force is not None:
        route = force
    else:
        bound = max_extra_bytes(device_type)
        fits = [r for r in costs if memory[r] <= bound] or ["ghost"]
        route = min(fits, key=costs.__getitem__)
    return RoutePlan(route, shape, costs[route], memory[route], alternatives=costs)


@functools.lru_cache(maxsize=4096)
def _route_name(B: int, T: int, d: int, p: int, device_type: str, *model_state) -> str:
    return linear_route(B, T, d, p, device_type=device_type).route


def linear_route_name(B: int, T: int, d: int, p: int, device_type: str = "cpu") -> str:
    """``linear_route(...).route``, memoised: the hot path asks it on every call of every layer
    (the key holds what the model reads besides the shape: threads, kernels, the memory bound)."""
    return _route_name(B, T, d, p, device_type, torch.get_num_threads(), triton_kernels(device_type),
                       MAX_EXTRA_BYTES, CUDA_MAX_EXTRA_BYTES)

"""Squared norms of large tensors, accurate to float32 rounding at any size, in one pass.

Neither one-call reduction is good enough for a gradient of tens of millions of elements:
``torch.linalg.vector_norm`` in float32 loses ~2e-5 (relative) over a million elements on CPU,
and BLAS ``dot``'s accuracy depends on the library and the CPU (measured with MKL on an AMD
EPYC: 2e-6 over 2^20 elements, 6.5e-4 over 38M, a GPT-2 embedding table's gradient).
So the storage is cut into blocks of ``_BLOCK`` elements, one batched ``bmm`` takes every
block's dot product at BLAS speed (each accumulates only ``_BLOCK`` terms in float32), and the
block sums are added in float64. Over 38M elements: 1.4e-8 for float32 data and 1.3e-7 for
bfloat16-valued data (whose few-bit squares round with a bias in long sums: 6e-6 with 64K-element
blocks), in 7 ms against a single ``dot``'s 5.5 ms on 2 cores.
Float16/bfloat16 are converted to float32 chunk by chunk, never whole; a strided view with no
flat storage is accumulated in float64.
"""

from __future__ import annotations

import math

import torch


def _dense_flat(t: torch.Tensor) -> torch.Tensor | None:
    """A flat view of a dense, non-overlapping tensor in memory order (None for other views);
    the order of elements does not matter to a norm."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    p = t.permute(order)
    return p.view(-1) if p.is_contiguous() else None


#: Elements per float32 dot product: bounds how many terms one float32 accumulator adds.
_BLOCK = 1 << 10

#: Elements converted to float32 at a time for float16/bfloat16 inputs (16 MiB of scratch).
_CHUNK = 1 << 22

#: Most float32 partial sums ``SquaredNormSum`` keeps of one tensor until ``total()``; a larger
#: tensor's are added up in float64 at once (one op more, next to its size nothing), so what is
#: kept stays a few KiB per parameter whatever the model's size.
_KEPT_PARTIALS = 4096


def _block_sums(flat: torch.Tensor) -> list[torch.Tensor]:
    """The squares of a 1-D float32 tensor summed in float32 over blocks of at most ``_BLOCK``
    elements: a list of a 0-dim tensor (``n <= _BLOCK``), of a ``[blocks, 1, 1]`` tensor (``n`` a
    multiple of 256), or of both (the blocks and a shorter tail); their float64 sum is ``||flat||²``
    (see the module docstring)."""
    n = flat.numel()
    if n <= _BLOCK:  # the common small tensor (a bias, a norm's weight): one op
        return [torch.dot(flat, flat)]
    block = math.gcd(n, _BLOCK)
    if block >= _BLOCK // 4:  # (most weights) equal blocks of 256-1024 elements, no tail: one product
        head = flat.view(n // block, 1, block)
        return [torch.bmm(head, head.transpose(1, 2))]
    blocks = n // _BLOCK
    head = flat[: blocks * _BLOCK].view(blocks, 1, _BLOCK)
    tail = flat[blocks * _BLOCK:]
    return [torch.dot(tail, tail), torch.bmm(head, head.transpose(1, 2))]


def _f64_total(parts: list[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of every element of ``parts`` (float32 partial sums), a 0-dim tensor."""
    scalars = [t for t in parts if t.dim() == 0]
    blocks = [t.reshape(-1) for t in parts if t.dim() > 0]
    if scalars:
        blocks.append(torch.stack(scalars) if len(scalars) > 1 else scalars[0].reshape(1))
    flat = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return flat.sum(dtype=torch.float64)


def _partial_sums(t: torch.Tensor) -> list[torch.Tensor] | None:
    """``t``'s squares as float32 partial sums for ``_f64_total`` (float16/bfloat16: converted to
    float32 in chunks of ``_CHUNK``, never whole), or None for a float64 tensor or a strided view
    with no flat storage, which ``squared_norm`` reduces in float64 instead."""
    if t.dtype == torch.float64:
        return None
    flat = _dense_flat(t)
    if flat is None:
        return None
    if flat.dtype == torch.float32:
        return _block_sums(flat)
    return [part for chunk in flat.split(_CHUNK) for part in _block_sums(chunk.float())]


def _f64_squared_norm(t: torch.Tensor) -> torch.Tensor:
    """``||t||²`` in float64 (0-dim) for the tensors ``_partial_sums`` leaves out."""
    if t.dtype == torch.float64:  # vector_norm refuses to downcast; keep float64 until the end
        return torch.linalg.vector_norm(t).square()
    return torch.linalg.vector_norm(t, dtype=torch.float64).square()


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    """``||t||²`` as a float32 0-dim tensor, accurate to float32 rounding at any size (float16/
    bfloat16: converted to float32 in bounded chunks, never whole)."""
    return _f64_sum_of_squares(t).float()


def _f64_sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """``||t||²`` as a float64 0-dim tensor (``squared_norm`` before its rounding to float32)."""
    parts = _partial_sums(t)
    return _f64_squared_norm(t) if parts is None else _f64_total(parts)


def squared_distance(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||t - ref||²`` as a float32 0-dim tensor (``t`` of any floating dtype, ``ref`` float32 of
    its shape), accurate as ``squared_norm``, with no ``t``-sized temporary: the difference is
    taken over slices of at most ``_CHUNK`` elements along the first dimension. The tracker's
    check of a whole gradient runs while the model's gradients are live, where a float32 copy of
    the largest weight could be the step's peak (a 32000 x 4096 head: 512 MiB)."""
    if t.dim() == 0 or t.numel() <= _CHUNK or t.shape != ref.shape:
        return squared_norm(t.float() - ref)
    rows = max(1, _CHUNK // max(1, t[0].numel()))
    parts = [_f64_sum_of_squares(a.float() - b) for a, b in zip(t.split(rows), ref.split(rows))]
    return torch.stack(parts).sum().float()


def _one_launch_per_tensor(t: torch.Tensor) -> bool:
    """Whether ``SquaredNormSum`` takes ``t``'s norm in one reduction (CUDA) instead of the blocked
    float64 path of ``squared_norm``."""
    return t.is_cuda


class SquaredNormSum:
    """``Σ ||t||²`` over tensors added one at a time (a backward's parameter gradients, as they
    arrive), read once as a float32 0-dim tensor; nothing is scaled.

    A small model's step is bound by the ops dispatched per parameter (launches on a GPU, the
    dispatcher on a CPU), so ``add`` takes as few as it can and ``total()`` adds everything up in
    a few ops. On CPU, ``add`` keeps each tensor's float32 block partial sums (one ``dot`` for a
    tensor of at most ``_BLOCK`` elements; a CPU float32 reduction over a million elements would
    lose ~2e-5) and ``total()`` sums them all in float64. On CUDA each tensor's norm is one
    ``torch.linalg.vector_norm`` reduction in float32 (a tree over thread blocks, accurate in
    float32), and ``total()`` squares and sums them in float64. No tensor is held past ``add``:
    what is kept is at most ``_KEPT_PARTIALS`` scalars per tensor.
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._norms: list[torch.Tensor] = []  # CUDA: float32 norms (not squared)
        self._partials: list[torch.Tensor] = []  # CPU: float32 partial sums of squares
        self._large: list[torch.Tensor] = []  # CPU: float64 sums of squares of large tensors

    def add(self, t: torch.Tensor) -> None:
        if _one_launch_per_tensor(t):
            # (float64 cannot be reduced into float32 by vector_norm: its norm is cast after)
            self._norms.append(torch.linalg.vector_norm(t).float() if t.dtype == torch.float64
                               else torch.linalg.vector_norm(t, dtype=torch.float32))
            return
        parts = _partial_sums(t)
        if parts is None:
            self._large.append(_f64_squared_norm(t))
        elif sum(part.numel() for part in parts) > _KEPT_PARTIALS:
            self._large.append(_f64_total(parts))
        else:
            self._partials.extend(parts)

    def total(self) -> torch.Tensor | None:
        """The float32 sum of squares, or None when nothing was added."""
        parts = []
        if self._norms:
            parts.append(torch.stack(self._norms).double().square().sum())
            self._norms = []
        if self._partials:
            parts.append(_f64_total(self._partials))
            self._partials = []
        if self._large:
            parts.append(torch.stack(self._large).sum() if len(self._large) > 1 else self._large[0])
            self._large = []
        if parts:
            part = (parts[0] if len(parts) == 1 else torch.stack(parts).sum()).float()
            self._sum = part if self._sum is None else self._sum + part
        return self._sum

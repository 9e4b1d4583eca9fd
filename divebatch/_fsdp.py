"""FSDP2 (``torch.distributed.fsdp.fully_shard``): which parameters it shards, and the squared
norm of gradients left sharded across ranks.

``fully_shard`` keeps each parameter as a ``DTensor`` shard (what ``model.parameters()`` and the
optimizer see) and, around each forward and backward, swaps the module's attribute for a full,
unsharded ``nn.Parameter`` (one object per parameter, reused every step) that autograd then
differentiates. The tracker therefore hooks that unsharded object the first time a forward runs
with it, and reads parameter values from the module at that time (see
``GradNormTracker._live``); after the backward, ``.grad`` of the shard holds this rank's slice of
the gradient averaged over ranks, like DDP's ``.grad`` (see :func:`sharded_sq_norm`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ._norms import squared_norm

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - a build without torch.distributed
    DTensor = Replicate = Shard = FSDPModule = None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. a parameter shard of FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


def managed_parameters(model: nn.Module) -> set[int]:
    """``id``s of the parameters that ``fully_shard`` manages in ``model`` (empty without FSDP2)."""
    if FSDPModule is None:
        return set()
    return {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}


def sharded_sq_norm(grad: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``||grad||²`` for a ``DTensor`` gradient, in float64: the local shard's
    squared norm divided by the number of ranks holding a copy of it (``Replicate`` mesh dims),
    so that the sum over all ranks of the mesh is the squared norm of the whole gradient.

    Raises for a ``Partial`` placement (a gradient not yet reduced: its norm is not the sum of the
    ranks' parts).
    """
    for placement in grad.placements:
        if not isinstance(placement, (Replicate, Shard)):
            raise ValueError(f"a gradient with placement {placement} (not reduced over ranks yet) has no squared norm "
                             "from its shards; read it after the backward that reduce-scatters it (FSDP's last "
                             "micro-batch, with gradient sync on)")
    return squared_norm(grad.to_local().detach()).double() / copies(grad)


def innermost_units(model: nn.Module) -> dict[int, nn.Module]:
    """``id(module) -> the innermost fully_shard module whose subtree holds it`` for every module
    of ``model`` under one (the one that gathers its parameters); one walk over the tree."""
    units: dict[int, nn.Module] = {}

    def visit(module: nn.Module, unit: nn.Module | None) -> None:
        if FSDPModule is not None and isinstance(module, FSDPModule):
            unit = module
        if unit is not None:
            units.setdefault(id(module), unit)
        for child in module.children():
            visit(child, unit)

    visit(model, None)
    return units


@contextmanager
def gathered(units):
    """The parameters of ``units`` (``FSDPModule``s) unsharded while the block runs: an all-gather
    on every rank of their mesh, so every rank must enter it for the same units."""
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def is_fully_sharded(model) -> bool:
    """Whether ``model`` itself was passed to ``fully_shard`` (the root of an FSDP2 model)."""
    return FSDPModule is not None and isinstance(model, FSDPModule)


@contextmanager
def no_gradient_sync(model):
    """FSDP2's ``no_sync()``: backwards in the block keep their unsharded gradients (accumulated,
    not reduce-scattered), for the micro-batches before a step's last."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (``to_local()``), any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def copies(t: torch.Tensor) -> int:
    """How many ranks hold each element of ``t``'s local part: the sizes of its ``Replicate``
    mesh dims (1 for a tensor that is not a DTensor, or is sharded over every mesh dim)."""
    if not is_dtensor(t):
        return 1
    n = 1
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            n *= t.device_mesh.size(dim)
    return n


def legacy_wrapped(model: nn.Module) -> str | None:
    """The name of the first ``FullyShardedDataParallel`` (FSDP1) module in ``model``, or None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a build without torch.distributed
        return None
    return next((name or "<the model>" for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)),
                None)


def whole(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like ``param``'s local shard, made whole (an all-gather on every rank of
    the mesh); ``local`` itself where ``param`` is not a DTensor."""
    if not is_dtensor(param):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor()


def local_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (shaped like ``param``) as ``param`` is laid out: no
    communication, every rank holds ``full``; ``full`` itself where ``param`` is not a DTensor."""
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def shard_children(model: nn.Module, device: torch.device | None = None, *, mesh=None, units=None,
                   **fully_shard_kwargs) -> nn.Module:
    """FSDP2: each of ``units`` (default: each child of ``model`` that has parameters and a forward
    of its own; ``fully_shard`` refuses bare containers) becomes a ``fully_shard`` unit, then the
    model (the rest). ``mesh`` defaults to every rank of the default process group on ``device``'s
    type; ``fully_shard_kwargs`` (e.g. ``mp_policy``) go to every call. Returns ``model``
    (``fully_shard`` changes it in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if units is None:
        units = [child for child in model.children()
                 if any(True for _ in child.parameters()) and type(child).forward is not nn.Module.forward]
    for unit in units:
        fully_shard(unit, mesh=mesh, **fully_shard_kwargs)
    return fully_shard(model, mesh=mesh, **fully_shard_kwargs)

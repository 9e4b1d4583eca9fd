"""The methods compared side by side: each runs one training step's forward and backward and
returns per-sample ``||g_i||^2`` of the unscaled per-sample loss (None for plain).

Methods whose library is not installed raise ``MethodUnavailable`` at construction, so the
table and pytest-benchmark skip them cleanly.
"""

from __future__ import annotations

import os
from unittest import mock

import torch
from torch.func import functional_call, grad, vmap

from divebatch import GradNormTracker


class MethodUnavailable(RuntimeError):
    """The library behind a method is missing or refuses the workload."""


class Method:
    name = "?"

    def __init__(self, workload, model):
        self.workload = workload
        self.model = model
        self.forward = model  # what the step calls: the model, or its torch.compile'd wrapper

    def step(self, x, y):
        raise NotImplementedError

    def close(self):
        pass


class Plain(Method):
    """Forward + backward, nothing else (the floor)."""

    name = "plain"

    def step(self, x, y):
        self.model.zero_grad(set_to_none=True)
        self.workload.loss(self.forward(x), y).backward()
        return None


class DiveBatch(Method):
    """divebatch.GradNormTracker with the routes its cost model picks."""

    name = "divebatch"
    fused = True

    def __init__(self, workload, model):
        super().__init__(workload, model)
        self.tracker = None

    def step(self, x, y):
        if self.tracker is None:
            self.tracker = GradNormTracker(self.model, loss_reduction=self.workload.scale(x, y), fused=self.fused)
        self.model.zero_grad(set_to_none=True)
        self.workload.loss(self.forward(x), y).backward()
        stats = self.tracker.collect()
        return stats.per_sample

    def close(self):
        if self.tracker is not None:
            self.tracker.close()


class DiveBatchUnfused(DiveBatch):
    """divebatch with ``fused=False``: norms on top of autograd's own weight gradients."""

    name = "divebatch-unfused"
    fused = False


class _DiveBatchWithout(DiveBatch):
    """divebatch with one of ``divebatch.layers.generic``'s names (``patched``) replaced by
    ``replacement`` during each step: a route switched off, measured side by side."""

    patched = ""
    replacement = None

    def step(self, x, y):
        from divebatch.layers import generic

        original = getattr(generic, self.patched)
        setattr(generic, self.patched, self.replacement)
        try:
            return super().step(x, y)
        finally:
            setattr(generic, self.patched, original)


class DiveBatchReplay(_DiveBatchWithout):
    """divebatch with products of a module's own weights on rows left unread (``layers/experts.py``
    off): mixture-of-experts experts and routers replayed per sample, as before that route."""

    name = "divebatch-replay"
    patched = "ExpertUses"
    replacement = staticmethod(lambda *args: None)


class DiveBatchVmappedStandardisation(_DiveBatchWithout):
    """divebatch with weight-standardised products left to the generic computed-weights route
    (``layers/standardised.py`` off): each sample's weight gradient pulled back through
    ``batch_norm`` under ``vmap``, as before the closed form."""

    name = "divebatch-vmap-ws"
    patched = "standardised_product"
    replacement = staticmethod(lambda *args: False)


class _DiveBatchWithEnv(DiveBatch):
    """divebatch with the environment variables ``env`` set during each step (opt-in kernels)."""

    env: dict[str, str] = {}

    def step(self, x, y):
        with mock.patch.dict(os.environ, self.env):
            return super().step(x, y)


class DiveBatchImplicitConv(_DiveBatchWithEnv):
    """divebatch with ``DIVEBATCH_TRITON_IMPLICIT_CONV=1`` during each step: on CUDA the fused
    convolution route reads its patches from the input in place (``ops.conv_instantiate_norm``)
    instead of unfolding them; elsewhere the same as divebatch."""

    name = "divebatch-implicit-conv"
    env = {"DIVEBATCH_TRITON_IMPLICIT_CONV": "1"}


class DiveBatchGhostWide(_DiveBatchWithEnv):
    """divebatch with ``DIVEBATCH_TRITON_GHOST_WIDE=1`` during each step: on CUDA the Gram route's
    kernel on 128 x 256 tiles (``kernels/ghost_norm.py``, ``_ghost_norm_wide_kernel``) instead of
    128 x 128; elsewhere the same as divebatch."""

    name = "divebatch-ghost-wide"
    env = {"DIVEBATCH_TRITON_GHOST_WIDE": "1"}


class DiveBatchFusedEverywhere(DiveBatch):
    """divebatch with the CUDA route model told to fuse every Linear it can (``FUSED_CUDA_EXTRA_COST``
    0, ``FUSED_CUDA_MAX_WEIGHT`` unbounded, in ``divebatch/layers/linear.py``): on CUDA the fused
    instantiate kernel replaces the weight-gradient GEMM of seq-large's 4096 x 16384 layers and head,
    which the model leaves to the Gram route while that kernel runs 2.2x the GEMM (the first H200
    run). Its step beside divebatch's says what the fused route's newer configs give end to end;
    elsewhere (CPU) the same as divebatch."""

    name = "divebatch-fused-everywhere"

    def step(self, x, y):
        from divebatch.layers import linear

        with mock.patch.multiple(linear, FUSED_CUDA_EXTRA_COST=0.0, FUSED_CUDA_MAX_WEIGHT=float("inf")):
            return super().step(x, y)


class PlainCompiled(Plain):
    """The plain step through ``torch.compile(model)`` (inductor): the floor for divebatch-compiled."""

    name = "plain-compiled"

    def __init__(self, workload, model):
        super().__init__(workload, model)
        self.forward = torch.compile(model)


class DiveBatchCompiled(DiveBatch):
    """divebatch tracking the model that ``torch.compile`` runs (tracked modules run eagerly at graph
    breaks; the code between them is compiled)."""

    name = "divebatch-compiled"

    def __init__(self, workload, model):
        super().__init__(workload, model)
        self.forward = torch.compile(model)


class TorchFunc(Method):
    """torch.func: vmap(grad) per-sample gradients of the unscaled loss, then their norms."""

    name = "torch.func"

    def step(self, x, y):
        model, loss = self.model, self.workload.sample_loss
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        buffers = dict(model.named_buffers())

        def one(p, xi, yi):
            return loss(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

        if not getattr(self, "looped", False):
            try:
                grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
                return sum(g.flatten(1).float().square().sum(1) for g in grads.values())
            except RuntimeError:
                # No batching rule for a layer's backward (GRU's): one sample at a time from now on,
                # as a torch.func user would have to.
                self.looped = True
        rows = [grad(one)(params, x[b], y[b]) for b in range(x.shape[0])]
        return torch.stack([sum(g.float().square().sum() for g in row.values()) for row in rows])


class _Opacus(Method):
    ghost = False

    def __init__(self, workload, model):
        super().__init__(workload, model)
        try:
            if self.ghost:
                from opacus.grad_sample import GradSampleModuleFastGradientClipping as GSM

                self.gsm = GSM(model, loss_reduction="mean", use_ghost_clipping=True)
            else:
                from opacus import GradSampleModule

                self.gsm = GradSampleModule(model, loss_reduction="mean")
        except ImportError as err:
            raise MethodUnavailable(f"opacus not installed ({err})") from err
        except Exception as err:  # noqa: BLE001 - opacus refuses some layers
            raise MethodUnavailable(f"opacus refused the model: {err}") from err

    def step(self, x, y):
        self.gsm.zero_grad(set_to_none=True)
        # Opacus' "mean" multiplies backprops by B, i.e. reports gradients of B * c * l_i.
        factor = (x.shape[0] * self.workload.scale(x, y)) ** 2
        self.workload.loss(self.gsm(x), y).backward()
        if self.ghost:
            return self.gsm.get_norm_sample().square() / factor
        return sum(p.grad_sample.flatten(1).square().sum(1) for p in self.model.parameters()) / factor

    def close(self):
        self.gsm._close()


class OpacusHooks(_Opacus):
    """Opacus 1.6 GradSampleModule (per-sample gradients by hooks)."""

    name = "opacus"


class OpacusGhost(_Opacus):
    """Opacus 1.6 fast gradient clipping with ghost clipping (norms without instantiation)."""

    name = "opacus-ghost"
    ghost = True


class BackPACK(Method):
    """BackPACK BatchL2Grad; its output is c^2-scaled, so it is divided by c^2 here."""

    name = "backpack"

    def __init__(self, workload, model):
        super().__init__(workload, model)
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchL2Grad
        except ImportError as err:
            raise MethodUnavailable(f"backpack-for-pytorch not installed ({err})") from err
        self.model = extend(model)
        self.context = lambda: backpack(BatchL2Grad())

    def step(self, x, y):
        self.model.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.model(x), y)
        with self.context():
            loss.backward()
        c2 = self.workload.scale(x, y) ** 2
        parts = [p.batch_l2 for p in self.model.parameters() if hasattr(p, "batch_l2")]
        # Layers BackPACK does not support (LayerNorm) are silently missing: the error column shows it.
        return sum(parts) / c2


METHODS = [Plain, DiveBatch, TorchFunc, OpacusHooks, OpacusGhost, BackPACK, DiveBatchUnfused, DiveBatchReplay,
           DiveBatchVmappedStandardisation, DiveBatchImplicitConv, DiveBatchGhostWide, DiveBatchFusedEverywhere,
           PlainCompiled, DiveBatchCompiled]


def build(method_cls, workload, seed=0, device="cpu", dtype=None):
    """A fresh model, initialised from ``seed`` (so every method gets the same weights) directly
    on ``device`` (no CPU copy of a large model) and cast to ``dtype``, wrapped by ``method_cls``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = workload.make_model()
    if dtype is not None:
        model = model.to(dtype)
    return method_cls(workload, model)

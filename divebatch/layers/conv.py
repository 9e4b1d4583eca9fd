"""nn.Conv1d/2d/3d: unfold into a linear map per group, then the linear routes.

A convolution is, per sample and group, ``Y = W_g U`` with ``U [Cin/groups * prod(k), T]`` the
unfolded (im2col) input patches and ``T`` the number of output positions, so its per-sample
weight gradient is ``G^T A`` with ``A = U^T`` and ``G`` the output grad flattened over positions.
Padding of every mode ('zeros', 'reflect', 'replicate', 'circular', and the strings 'same' /
'valid') is applied exactly as the module's forward does, from
``module._reversed_padding_repeated_twice``. The unfolded buffer is built for a bounded number of
samples at a time (``routes.MAX_EXTRA_BYTES``), so it never costs a whole batch of patches; on
CUDA, in contiguous rows where the positions are not a multiple of 16 (``rows_layout``: the
kernels' vector loads). On CUDA with the Triton kernels and ``DIVEBATCH_TRITON_IMPLICIT_CONV=1`` a one-group convolution's
patches are not unfolded at all: its kernels read them from the input in place
(``implicit_patches``: ``conv_instantiate_norm`` for the fused route, ``conv_ghost_norm`` or
``conv_instantiate_norm`` for the hooks' norms), from a channels-last copy of an NCHW input whose
channels come in multiples of 16 (``vector_layouts``: vector loads, at a ninth of the
unfolded copy's bytes for a 3x3 kernel).

nn.ConvTranspose1d/2d/3d take the same routes through the adjoint convolution (the output grad
is unfolded and the layer input plays the output grad's part), or, where a cost model fitted to CPU
timings says it is faster, per-sample weight gradients from one transposed-convolution weight
gradient with the batch folded into the groups (``ConvTransposeRule``).

Both rules also form the summed parameter gradient of their calls (``grad_sums``, for the tracker's
accounting check) with one ``convolution_backward`` per call.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from . import routes
from .base import LayerRule, RoutePlan, RuleError, fused_sink_grads, per_sample_sq, register
from .linear import fused_linear_route, fused_linear_route_name, linear_norms
from .routes import MAX_EXTRA_BYTES, linear_route, linear_route_name, max_extra_bytes


def _padded(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def padded_input(module: nn.modules.conv._ConvNd, ctx) -> torch.Tensor:
    """The input as the convolution itself sees it (padding applied) from a captured call.

    ``ctx`` is the raw input (hook path) or ``(input, zero_padding)`` from the fused path, whose
    input already carries any non-zero-mode padding.
    """
    if isinstance(ctx, tuple):
        return reference.zero_padded(*ctx)
    return _padded(module, ctx)


def unfold_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Patches of the padded input ``x [B, Cin, *spatial]`` as ``[B * groups, T, Cin/groups * prod(kernel)]``.

    Column order matches ``module.weight.view(Cout, -1)`` within each group. The result is a
    transposed view of a positions-last buffer (what im2col writes fastest), or, where
    ``rows_layout`` says so, a contiguous buffer of rows; the operators take any strides, so it is
    never copied again.
    """
    B, groups, n = x.shape[0], module.groups, len(module.kernel_size)
    windows = reference.conv_windows(x, module.kernel_size, module.stride, module.dilation)
    T, columns = math.prod(windows.shape[2:2 + n]), x.shape[1] // groups * math.prod(module.kernel_size)
    if rows_layout(T, x.device.type):
        # [B, G, C/G, o.., k..] -> [B, G, o.., C/G, k..]: each row a contiguous run of columns
        windows = windows.reshape(B, groups, x.shape[1] // groups, *windows.shape[2:])
        order = (0, 1, *range(3, 3 + n), 2, *range(3 + n, 3 + 2 * n))
        # (.contiguous(): a 1 x 1 kernel's reshape is a view of x, positions-last)
        return windows.permute(order).reshape(B * groups, T, columns).contiguous()
    # (im2col by views and one reshape: measured on 2 cores 2-2.5x faster than F.unfold, which
    # writes the same [B, Cin * prod(k), T] layout)
    cols = reference.windows_as_patches(windows, n)
    return cols.view(B * groups, cols.shape[1] // groups, cols.shape[2]).transpose(1, 2)


#: The Triton compiler vectorises a load along a dimension only where it knows the sizes and strides
#: involved divisible by this (it specialises integer arguments divisible by 16, nothing finer): the
#: multiple that ``rows_layout`` and ``vector_layouts`` test positions and channels against.
VECTOR_DIVISOR = 16


def rows_layout(T: int, device_type: str) -> bool:
    """Whether the unfolded routes hand the Triton kernels contiguous rows (``[B, T, d]`` patches,
    ``[B, T, p]`` output grads, columns fastest) instead of positions-last views: where the kernels
    serve ``device_type`` and ``T`` is not a multiple of 16. The kernels load a positions-last view
    as vectors only where the compiler knows ``T`` divisible by 16; else element by element,
    outside the software pipeline (sm_90 PTX of the ghost kernel at 128 x 32: 80 ``ld.global``, no
    ``cp.async``, 216 registers; in rows, 24 ``cp.async``: tests/test_triton_compile.py's
    ``positions-last`` variant), which a ResNet's 14 x 14 and 7 x 7 maps would get. Rows cost the
    same unfold (another order of the one copy) and a copy of the output grad. On CPU the C++
    kernels take either at the same speed and the positions-last copy is the faster unfold."""
    return T % VECTOR_DIVISOR != 0 and routes.triton_kernels(device_type)


def _unfold_chunk(B: int, patch_elements: int, device_type: str) -> int:
    """Samples per chunk of unfolded patches (``patch_elements`` per sample), within
    ``routes.max_extra_bytes`` (``MAX_EXTRA_BYTES``; more on CUDA, where chunks cost launches)."""
    return max(1, min(B, int(max_extra_bytes(device_type) // max(4 * patch_elements, 1))))


def _joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' per-sample norms in one ``[B]`` tensor (a batch in one chunk: no copy, no launch)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def grouped_grad(module: nn.modules.conv._ConvNd, g: torch.Tensor) -> torch.Tensor:
    """Output grad ``[B, Cout, *out]`` as ``[B * groups, T, Cout/groups]``: a transposed view, or
    contiguous rows (a copy) where ``rows_layout`` says so."""
    B, Cout = g.shape[:2]
    rows = g.reshape(B * module.groups, Cout // module.groups, -1).transpose(1, 2)
    return rows.contiguous() if rows_layout(rows.shape[1], g.device.type) else rows


def _unbatched(module, x):
    if x.dim() != len(module.kernel_size) + 2:
        raise ValueError(f"{type(module).__name__} got an input of shape {tuple(x.shape)} without a batch "
                         f"dimension; divebatch needs batched input [B, C, *spatial]")


_PLAIN_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """Rule for ``nn.Conv{1,2,3}d`` with any stride, padding, dilation, groups, padding mode."""

    def capture(self, module, args, kwargs, output):
        x = args[0].detach()
        _unbatched(module, x)
        return x

    def batch_size(self, module, ctx):
        return (ctx[0] if isinstance(ctx, tuple) else ctx).shape[0]

    def _dims(self, module, x, g):
        d = module.in_channels // module.groups
        for k in module.kernel_size:
            d *= k
        return d, g[0].numel() // module.out_channels, module.out_channels // module.groups

    def chunk_size(self, module, x, g) -> int:
        """Samples per unfold chunk so the patch buffer stays under ``routes.max_extra_bytes``."""
        d, T, _ = self._dims(module, x, g)
        return _unfold_chunk(x.shape[0], module.groups * T * d, x.device.type)

    def norms(self, module, calls, tracked):
        with_weight, with_bias = "weight" in tracked, "bias" in tracked
        B = self.batch_size(module, calls[0][0])
        groups = module.groups
        if not with_weight:
            total = 0
            for _, grads in calls:
                total = total + grads[0].reshape(B, module.out_channels, -1).sum(dim=2, dtype=torch.float32)
            return total.square().sum(dim=1)
        route = _implicit_hook_route(module, calls[0][1][0]) if len(calls) == 1 else None
        if route is not None:
            return implicit_norms(module, calls[0][0], calls[0][1][0], with_bias, route)
        step = min(self.chunk_size(module, grads[0], grads[0]) for _, grads in calls)
        out = []
        for start in range(0, B, step):
            stop = min(B, start + step)
            a_parts, g_parts = [], []
            for x, grads in calls:
                a_parts.append(unfold_patches(module, padded_input(module, x)[start:stop]))
                g_parts.append(grouped_grad(module, grads[0][start:stop]))
            a = a_parts[0] if len(calls) == 1 else torch.cat(a_parts, dim=1)
            g = g_parts[0] if len(calls) == 1 else torch.cat(g_parts, dim=1)
            # Per group and sample: weight norm; the bias norm is per sample over all channels,
            # and the groups' channel sets are disjoint, so group bias norms add up too.
            per_group = linear_norms(a, g, True, with_bias)
            out.append(per_group if groups == 1 else per_group.view(stop - start, groups).sum(dim=1))
        return _joined(out)

    def grad_sums(self, module, calls, tracked):
        zeros = [0] * len(module.kernel_size)
        parts = [(padded_input(module, ctx), grads[0], zeros, zeros) for ctx, grads in calls]
        return conv_grad_sums(module, parts, tracked, transposed=False)

    def can_fuse(self, module, tracked) -> bool:
        """The fused path needs the weight tracked and a plain ``nn.ConvNd`` forward."""
        return "weight" in tracked and type(module).forward in _PLAIN_FORWARDS

    def fuse_call(self, module, x) -> bool:
        """See ``conv_fuses``."""
        if x.dim() != len(module.kernel_size) + 2:
            return True  # unbatched input: refused by the fused forward with its message
        return conv_fuses(module, x.shape, x.device.type)

    def fused_forward(self, module, args, kwargs, sink):
        x = args[0]
        _unbatched(module, x)
        padding = _symmetric_padding(module)
        if padding is None:  # the padding itself stays in autograd's graph
            x = _padded(module, x)
            padding = [0] * len(module.kernel_size)
        return _FusedConv.apply(x, module.weight, module.bias, padding, module, sink)

    def fused_grads(self, module, ctx, g, tracked):
        return fused_conv_grads(module, ctx, g, tracked)

    def fused_plan(self, module, ctx, tracked) -> RoutePlan:
        x, padding = ctx
        B, T = x.shape[0], _output_positions(module, x.shape[2:], [2 * pad for pad in padding])
        d = module.in_channels // module.groups * math.prod(module.kernel_size)
        if _unfolded_fused_route(module, not any(padding), B, T, d, module.out_channels, x.device.type):
            plan = fused_linear_route(B, T, d, module.out_channels, x.device.type)
            if implicit_patches(x.device):
                plan.route = "fused-implicit-instantiate"
                _with_copies(plan, x, None)
            else:
                plan.route = "fused-unfold-instantiate"
                plan.extra_bytes += 4.0 * _unfold_chunk(B, T * d, x.device.type) * T * d
            return plan
        flops = 2.0 * B * module.weight.numel() * T
        step = fused_chunk(module, x, x)
        return RoutePlan("fused-per-sample-conv", f"B={B} weight={tuple(module.weight.shape)} chunk={step}",
                         0.3 * flops, 4.0 * (module.weight.numel() + 2 * x[0].numel()) * step)

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        return self.plan_calls(module, [(ctx, [grad])], tracked)

    def plan_calls(self, module, calls, tracked) -> RoutePlan:
        # (several calls' patches are unfolded side by side, T positions in all, see norms)
        grads = [grads[0] for _, grads in calls]
        d, _, p = self._dims(module, grads[0], grads[0])
        T = sum(self._dims(module, g, g)[1] for g in grads)
        plan = linear_route(grads[0].shape[0] * module.groups, T, d, p, device_type=grads[0].device.type)
        if len(calls) == 1 and _implicit_hook_route(module, grads[0]) is not None:
            plan.route = f"implicit-{plan.route}"
            return _with_copies(plan, calls[0][0], grads[0])
        chunk = min(self.chunk_size(module, g, g) for g in grads)
        plan.extra_bytes += chunk * module.groups * T * d * 4
        plan.shape = f"{plan.shape} (unfold chunk {chunk})"
        return plan


def conv_fuses(module: nn.modules.conv._ConvNd, shape: torch.Size, device_type: str) -> bool:
    """Whether a call of ``module`` on an input of ``shape`` (batched) takes the fused path.

    On CPU where the grouped per-sample weight gradient beats autograd's weight gradient plus the
    unfolded route (``fused_conv_pays``): most layers, but not the deep layers of a CNN (few
    positions, many channels), whose per-sample gradients are large and slow to write. On CUDA with
    the Triton kernels only a one-group convolution whose unfolded patches take the fused
    instantiate kernel (``_unfolded_fused_route``): the grouped per-sample convolution writes every
    sample's weight gradient, a few samples per chunk and launches per chunk (a ResNet-18 at
    224 x 224, batch 64: ~500 grouped convolutions and ~9000 ops a step), where the kernels on
    unfolded patches keep them in registers (the others keep autograd's weight gradient and take
    the hook route). On
    CUDA without Triton (the reference's Gram products would run in float32) the grouped convolution."""
    pads = module._reversed_padding_repeated_twice[::-1]  # (right, left) pairs, first dim first
    T = _output_positions(module, shape[2:], [pads[2 * i] + pads[2 * i + 1] for i in range(len(shape) - 2)])
    d = module.in_channels // module.groups * math.prod(module.kernel_size)
    if routes.triton_kernels(device_type):
        return _unfolded_fused_route(module, not any(pads), shape[0], T, d, module.out_channels, device_type)
    if device_type != "cpu":
        return True
    return fused_conv_pays(shape[0], module.groups, T, d, module.out_channels // module.groups)


#: When to fuse a convolution (CPU), in flop equivalents fitted to 87 layer shapes (2 threads; 3x3
#: convolutions of 32-512 channels at 4x4 to 28x28, stride 1 and 2, B = 32 and 128, plus ResNet,
#: ConvNeXt, VGG and small-CNN layers): the fused route costs the batch's weight-gradient flops (as
#: autograd's) plus ``FUSED_PER_SAMPLE_GRAD_COST`` per per-sample gradient element (the grouped
#: convolution writes them and runs far below peak when positions are few); the hook route costs
#: autograd's weight gradient, ``FUSED_UNFOLD_COST`` per unfolded input element and its linear
#: route's flops. The model picks the faster route on 84 of the 87; the 3 misses cost 1.09-1.26x
#: on layers under 1 ms. The fused route loses by up to 17x (512 channels, 3x3 at 4x4, B = 128:
#: 374 ms against 55 ms) on the layers where it now steps aside.
FUSED_PER_SAMPLE_GRAD_COST = 90.0
FUSED_UNFOLD_COST = 180.0


def fused_conv_pays(B: int, groups: int, T: int, d: int, p: int) -> bool:
    """Whether the fused per-sample convolution beats the hook route for one call on CPU: ``B``
    samples, ``T`` output positions, ``d = Cin/groups * prod(k)``, ``p = Cout/groups``."""
    return _fused_conv_pays(B, groups, T, d, p, torch.get_num_threads())


@functools.lru_cache(maxsize=4096)
def _fused_conv_pays(B: int, groups: int, T: int, d: int, p: int, threads: int) -> bool:
    # ``threads`` keys the cache only: ``linear_route`` reads the thread count for its memory bound.
    per_sample_grads = B * groups * d * p
    hook_route = FUSED_UNFOLD_COST * B * groups * T * d + linear_route(B * groups, T, d, p).flops
    return FUSED_PER_SAMPLE_GRAD_COST * per_sample_grads < hook_route


#: Where a non-overlapping convolution (stride equal to the kernel, no dilation, no padding, one
#: group: a ViT's or Swin's patch embedding, ConvNeXt's downsampling, a 1x1 convolution) is fused
#: (``fused_conv_pays``: the choice between fused and hooks is the fitted model's), the fused path takes its unfolded
#: patches through the fused linear route (``instantiate_norm``: each sample's ``p x d`` tile squared
#: and summed into the weight gradient, never written whole) where a sample's gradient has at least
#: this many elements (``d * p``). Unfolding such a convolution copies the input once, in another
#: order, without duplicating it, and the tile route runs at GEMM speed, while the grouped
#: per-sample convolution writes every per-sample gradient and runs slowly with large kernels.
#: Timed on 28 shapes (``bench/conv_patch_routes.py``, recorded in bench/results/; 2 threads; kernels
#: 1, 2, 4, 8 and 16, Cin 3-1024, Cout 32-2048, B 8-64), each route as the fused path runs it: of
#: the 25 the cost model fuses, the faster of the two was taken on 19; the 6 misses cost 1.02-1.14x
#: (3-channel 4x4 stems and small 2x2 layers, within this VM's run-to-run noise). The wins are
#: larger: a ViT-B/16-style patch embedding (B = 8, 3 -> 192 channels, 16x16 at 224x224) took 5.8 ms
#: against 6.4 ms grouped (4.3 against 9.1 in another run), a 2x2 downsampling from 192 to 384
#: channels 32 ms against 48 ms. A 1x1 convolution (a Linear over positions: ResNet bottlenecks,
#: inverted residuals) takes the unfolded route at any size: the grouped 1x1 convolution ran
#: 1.7-2x slower on all 7 such shapes fused (64 -> 256 channels at 56x56, B = 32: 46 ms against
#: 77 ms). End to end, a timm ResNet-50 in eval mode (B = 16, 128x128) measured 1.23-1.25x a plain
#: step against 1.32-1.34x before.
UNFOLDED_TILE_ELEMENTS = 16384


def _unfolded_fused_route(module, unpadded: bool, B: int, T: int, d: int, p: int, device_type: str) -> bool:
    """Whether the fused path unfolds this call and takes the fused linear route (see
    ``UNFOLDED_TILE_ELEMENTS``); ``unpadded``: the convolution reads its input without padding.

    On CUDA with the Triton kernels any one-group convolution whose unfolded patches the fused
    linear route takes (many positions against few channels: a CNN's early layers): the hook route
    would unfold its input too, so fusing only swaps autograd's weight-gradient convolution for
    the sum of the tiles the kernel forms anyway."""
    if routes.triton_kernels(device_type):
        return module.groups == 1 and fused_linear_route_name(B, T, d, p, device_type) == "fused-instantiate"
    return (unpadded and module.groups == 1 and tuple(module.stride) == tuple(module.kernel_size)
            and all(dil == 1 for dil in module.dilation)
            and (d * p >= UNFOLDED_TILE_ELEMENTS or all(k == 1 for k in module.kernel_size))
            and fused_linear_route_name(B, T, d, p, device_type) == "fused-instantiate")


def implicit_patches(device: torch.device) -> bool:
    """Whether the fused route reads a convolution's patches from its input in place
    (``ops.conv_instantiate_norm``: implicit GEMM, no unfolded copy, no padded copy) instead of
    unfolding them for ``ops.instantiate_norm``, and the hooks' norms of the others (one group)
    likewise (``implicit_norms``: ``ops.conv_ghost_norm``): where the Triton kernels serve ``device`` and
    ``DIVEBATCH_TRITON_IMPLICIT_CONV=1`` (read at each call). Off by default until a GPU has timed
    it against the unfolded route (``bench/gpu/bench_kernels.py``'s ``conv-*-implicit`` rows): it
    saves writing and reading the patches (~2 GB a step at conv-large) but gathers its loads by
    computed addresses, which no GPU has run yet (from channels-last copies where an NCHW layout
    would leave them unvectorised: ``vector_layouts``)."""
    if os.environ.get("DIVEBATCH_TRITON_IMPLICIT_CONV", "0").strip() != "1":
        return False
    return routes.triton_kernels(device.type)


def _implicit_hook_route(module: nn.modules.conv._ConvNd, g: torch.Tensor) -> str | None:
    """The linear route (``"ghost"`` or ``"instantiate"``) by which the hooks' norms of a one-group
    convolution with output grad ``g`` read its patches from the input in place (``implicit_norms``),
    or None where they unfold them: without ``implicit_patches``, or for T = 1's outer route (one
    patch per sample: nothing to save)."""
    if module.groups != 1 or not implicit_patches(g.device):
        return None
    T = g[0].numel() // module.out_channels
    d = module.in_channels * math.prod(module.kernel_size)
    route = linear_route_name(g.shape[0], T, d, module.out_channels, g.device.type)
    return route if route in ("ghost", "instantiate") else None


def implicit_norms(module: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor, with_bias: bool,
                   route: str) -> torch.Tensor:
    """Per-sample squared gradient norms [B] of one call of a one-group convolution (input ``x`` as
    the module received it, output grad ``g``) with its patches read from ``x`` in place:
    ``ops.conv_ghost_norm`` or ``ops.conv_instantiate_norm`` as ``route`` says (see
    ``_implicit_hook_route``), no unfolded copy, no chunks (only a non-zero padding mode pads a
    copy of ``x``)."""
    padding = _symmetric_padding(module)
    if padding is None:
        x, padding = _padded(module, x), [0] * len(module.kernel_size)
    sq = in_place_weight_norms(x, g, (module.kernel_size, module.stride, padding, module.dilation), route)
    if with_bias:
        sq = sq + g.reshape(g.shape[0], module.out_channels, -1).sum(dim=2, dtype=torch.float32).square().sum(dim=1)
    return sq


def in_place_weight_norms(x: torch.Tensor, g: torch.Tensor, geometry: tuple, route: str) -> torch.Tensor:
    """Per-sample squared weight-gradient norms [B] of the one-group convolution of ``x`` with output
    grad ``g`` and ``geometry`` (kernel size, stride, zero padding, dilation): ``ops.conv_ghost_norm``
    for the ``"ghost"`` route, else the norms of ``ops.conv_instantiate_norm``; ``x`` and ``g`` as
    ``vector_layouts`` gives them."""
    x, g = vector_layouts(x, g)
    return ops.conv_ghost_norm(x, g, *geometry) if route == "ghost" else ops.conv_instantiate_norm(x, g, *geometry)[0]


def vector_layouts(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-group convolution's input ``x [B, C, *in]`` and output grad ``g [B, O, *out]`` laid out
    for the implicit kernels' vector loads (16-byte runs that the software pipeline copies
    asynchronously; what they cannot load in runs, they gather one element at a time outside the
    pipeline: tests/test_triton_compile.py). A channels-last copy is made of

    * ``x`` where it is not channels-last and its channels come in multiples of 16: the kernels read
      a channels-last input's patch columns channel-fastest, in runs of channels, and an NCHW map
      cannot be read in runs (a padded window starts unaligned; ``% OW`` hides the positions'
      contiguity). ``B C prod(in)`` elements written once, against the ``B T C prod(kernel)`` of an
      unfolded route (a ninth for a 3 x 3 kernel at stride 1);
    * ``g`` where its rows ``[T, O]`` load in neither channels (channels-last, ``O`` a multiple of 16)
      nor positions (contiguous positions, ``T`` a multiple of 16), and ``O`` is a multiple of 16:
      an NCHW output grad of 14 x 14 or 7 x 7 positions (a ResNet's deep layers).

    (Multiples of 16, not 8: ``VECTOR_DIVISOR``.) No copy is made past ``routes.max_extra_bytes`` (the kernels then read the tensor as it is:
    exact, slower)."""
    return (_channels_last(x) if _copies(x, positions_serve=False) else x,
            _channels_last(g) if _copies(g, positions_serve=True) else g)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _copies(t: torch.Tensor, positions_serve: bool) -> bool:
    """Whether ``vector_layouts`` copies ``t`` (the output grad where ``positions_serve``: contiguous
    positions in multiples of 16 load in runs as well)."""
    if t.dim() < 3 or t.shape[1] % VECTOR_DIVISOR != 0 or t.stride(1) == 1:
        return False
    if positions_serve and math.prod(t.shape[2:]) % VECTOR_DIVISOR == 0 and _contiguous_positions(t):
        return False
    return t.numel() * t.element_size() <= max_extra_bytes(t.device.type)


def _contiguous_positions(t: torch.Tensor) -> bool:
    """Whether ``t [B, C, *spatial]``'s positions of a channel are one contiguous run."""
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _with_copies(plan: RoutePlan, x: torch.Tensor, g: torch.Tensor | None) -> RoutePlan:
    """An implicit route's ``plan`` with the copies ``vector_layouts`` makes of the patches' input
    ``x`` and the rows' output grad ``g`` (None: not known yet, the fused route's plan), in its
    bytes and shape."""
    copied = [(name, t) for name, t, rows in (("patches' input", x, False), ("output grad", g, True))
              if t is not None and _copies(t, positions_serve=rows)]
    if copied:
        plan.extra_bytes += sum(t.numel() * t.element_size() for _, t in copied)
        plan.shape = f"{plan.shape} (channels-last copy of the {' and '.join(name for name, _ in copied)})"
    return plan


def _output_positions(module, sizes, padding_totals) -> int:
    """Output positions per sample of the convolution of an input of spatial ``sizes``, padded by
    ``padding_totals`` elements per dim (both sides together)."""
    T = 1
    for n, k, s, dil, pad in zip(sizes, module.kernel_size, module.stride, module.dilation, padding_totals):
        T *= max(0, (n + pad - dil * (k - 1) - 1) // s + 1)
    return T


def _symmetric_padding(module) -> list[int] | None:
    """The module's zero padding as per-dim ints, or None when it must be applied by F.pad."""
    pads = module._reversed_padding_repeated_twice
    if module.padding_mode != "zeros":
        return None
    left, right = pads[0::2], pads[1::2]
    if list(left) != list(right):
        return None  # 'same' with an even kernel extent pads one more on the right
    return list(reversed(left))


class _FusedConv(torch.autograd.Function):
    """Convolution whose backward takes the weight gradient from per-sample weight gradients.

    Per-sample weight gradients come from one grouped weight-gradient convolution with the batch
    folded into the groups (input ``[1, B*Cin, ...]``, grad ``[1, B*Cout, ...]``, groups ``B*g``);
    their batch sum is the weight gradient, so autograd's own weight-gradient convolution is
    replaced rather than repeated. ``sink`` as in ``linear._FusedLinear``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding, module, sink):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.module, ctx.sink, ctx.has_bias = padding, module, sink, bias is not None
        m = module
        return torch.convolution(x, weight, bias, m.stride, padding, m.dilation, False, [0] * len(padding), m.groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        m, padding = ctx.module, ctx.padding
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                g, x, weight, None, m.stride, padding, m.dilation, False, [0] * len(padding), m.groups,
                [True, False, False])[0]
        grad_w, grad_b = fused_sink_grads(ctx.sink, (x, padding), g)
        if grad_w is None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, x, weight, [weight.shape[0]] if ctx.has_bias else None, m.stride, padding, m.dilation, False,
                [0] * len(padding), m.groups, [False, True, ctx.has_bias])
        return grad_x, grad_w, grad_b, None, None, None


def per_sample_conv_weight_grads(module, x, padding, g) -> torch.Tensor:
    """``[B, Cout, Cin/groups, *kernel]`` per-sample weight gradients of one call (float32)."""
    return conv_weight_grads(x, g, module.weight.shape, module.stride, padding, module.dilation, module.groups)


def conv_weight_grads(x, g, weight_shape, stride, padding, dilation, groups: int) -> torch.Tensor:
    """``[B, *weight_shape]`` per-sample weight gradients of a convolution of ``x [B, Cin, ...]``
    with output grad ``g``: one grouped weight-gradient convolution with the batch folded into
    the groups. ``stride``, ``padding`` and ``dilation`` have one entry per spatial dim."""
    B, out_channels = x.shape[0], weight_shape[0]
    grads = torch.ops.aten.convolution_backward(
        g.reshape(1, B * out_channels, *g.shape[2:]), x.reshape(1, B * x.shape[1], *x.shape[2:]),
        torch.empty((B * out_channels, *weight_shape[1:]), dtype=x.dtype, device=x.device), None, list(stride),
        list(padding), list(dilation), False, [0] * len(padding), groups * B, [False, True, False])[1]
    return grads.view(B, *weight_shape)


def fused_chunk(module, x, g) -> int:
    """Samples per grouped weight-gradient call: the per-sample gradients and the copies of input
    and output grad the convolution library makes for one chunk stay under ``MAX_EXTRA_BYTES``."""
    per_sample = 4 * (module.weight.numel() + x[0].numel() + g[0].numel())
    return max(1, min(x.shape[0], int(MAX_EXTRA_BYTES // per_sample)))


def fused_conv_grads(module, ctx, g, tracked):
    """``(per-sample sq [B], grad_weight, grad_bias)`` of one call, in memory-bounded chunks."""
    x, padding = ctx
    B = x.shape[0]
    T, d = g[0].numel() // module.out_channels, module.in_channels // module.groups * math.prod(module.kernel_size)
    if _unfolded_fused_route(module, not any(padding), B, T, d, module.out_channels, x.device.type):
        if implicit_patches(x.device):
            sq, grad_w = ops.conv_instantiate_norm(*vector_layouts(x, g), module.kernel_size, module.stride, padding,
                                                   module.dilation)
            grad_w = grad_w.view(module.weight.shape)
        else:
            sq, grad_w = unfolded_weight_norms(module, padded_input(module, ctx), g)
    else:
        sq, grad_w = grouped_weight_norms(module, x, padding, g)
    grad_b = None
    if module.bias is not None:
        # (summed in float32 straight from g: no float32 copy of a 16-bit output grad)
        per_sample_bias = g.reshape(B, module.out_channels, -1).sum(dim=2, dtype=torch.float32)
        if "bias" in tracked:
            sq = sq + per_sample_bias.square().sum(dim=1)
        grad_b = per_sample_bias.sum(dim=0).to(module.bias.dtype)
    return sq, grad_w.to(module.weight.dtype), grad_b


def unfolded_weight_norms(module, x, g) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-sample squared weight-gradient norms [B], weight gradient)`` of a one-group
    convolution of the padded input ``x`` (see ``_unfolded_fused_route``): its unfolded patches
    through ``instantiate_norm``, a bounded chunk of samples at a time."""
    B = x.shape[0]
    T, d = g[0].numel() // module.out_channels, module.in_channels * math.prod(module.kernel_size)
    step, sq, grad_w = _unfold_chunk(B, T * d, x.device.type), [], None
    for start in range(0, B, step):
        w_sq, _, part = ops.instantiate_norm(unfold_patches(module, x[start:start + step]),
                                             grouped_grad(module, g[start:start + step]), False)
        sq.append(w_sq)
        grad_w = part if grad_w is None else grad_w + part
    return _joined(sq), grad_w.view(module.weight.shape)


def grouped_weight_norms(module, x, padding, g) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-sample squared weight-gradient norms [B], weight gradient)`` from the per-sample weight
    gradients of one grouped convolution with the batch folded into the groups, a bounded chunk of
    samples at a time (``fused_chunk``)."""
    step, sq, grad_w = fused_chunk(module, x, g), [], None
    for start in range(0, x.shape[0], step):
        psg = per_sample_conv_weight_grads(module, x[start:start + step], padding, g[start:start + step]).float()
        sq.append(per_sample_sq(psg))
        part = psg.sum(dim=0)
        grad_w = part if grad_w is None else grad_w + part
    return _joined(sq), grad_w


def _common_dtype(x: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    """One dtype for a convolution of ``x`` with ``g``: their promotion, and at least float32 on CPU
    (whose half-precision convolutions are slow and accumulate in half; autocast may also hand a
    float32 input and a bfloat16 output grad)."""
    dtype = torch.promote_types(x.dtype, g.dtype)
    return torch.promote_types(dtype, torch.float32) if x.device.type == "cpu" else dtype


def conv_grad_sums(module, parts, tracked, transposed: bool) -> dict[str, torch.Tensor]:
    """Weight and bias gradients (float32, summed over samples and ``parts``) of a convolution.

    ``parts`` holds ``(x, g, padding, output_padding)`` per call, ``x`` the input as the convolution
    reads it with zero ``padding``; one ``convolution_backward`` per call, at least in float32.
    """
    sums: dict[str, torch.Tensor] = {}
    for x, g, padding, output_padding in parts:
        dtype = torch.promote_types(_common_dtype(x, g), torch.float32)
        x, g = x.to(dtype), g.to(dtype)
        if "weight" in tracked:
            weight = torch.empty(module.weight.shape, dtype=dtype, device=x.device)  # only its shape is read
            part = torch.ops.aten.convolution_backward(
                g, x, weight, None, module.stride, padding, module.dilation, transposed, output_padding,
                module.groups, [False, True, False])[1].float()
            sums["weight"] = part if "weight" not in sums else sums["weight"] + part
        if "bias" in tracked:
            part = g.sum(dim=[0, *range(2, g.dim())], dtype=torch.float32)
            sums["bias"] = part if "bias" not in sums else sums["bias"] + part
    return sums


#: Cost model of ``ConvTransposeRule``'s two weight routes, in flop equivalents, fitted to CPU timings
#: of both routes on 48 layer shapes (2 threads; the commit that added the per-sample conv route has
#: the table). The unfolded route costs its linear route's flops plus ``UNFOLD_COST`` per element of
#: the unfolded output grad (``B * groups * T * d``). The per-sample convolution costs its flops,
#: ``2 B prod(weight) T``, times ``1 + NARROW_OUTPUT / d`` (its grouped weight-gradient GEMMs run far
#: below peak when each group's output row ``d = Cout/groups * prod(k)`` is short: 35-140 GFLOP/s at
#: d = 48 against 170-210 at d >= 256), plus ``PER_SAMPLE_GRAD_COST`` per per-sample gradient element.
#: With these weights the model picked the faster route on 44 of the 48 shapes; the 4 misses cost
#: 1.13-1.41x on layers under 2.1 ms.
UNFOLD_COST = 400.0
NARROW_OUTPUT = 300.0
PER_SAMPLE_GRAD_COST = 100.0

PER_SAMPLE_CONV = "per-sample conv"


@functools.lru_cache(maxsize=4096)
def _transpose_costs(B: int, groups: int, Ts: tuple[int, ...], d: int, p: int, sample_bytes: int,
                     max_bytes: float, threads: int) -> tuple[str, tuple[tuple[str, float], ...]]:
    """``(route, ((name, cost), ...))`` for a transposed convolution's weight norms (cost model).

    ``Ts``: input positions of each call; ``d = Cout/groups * prod(k)``, ``p = Cin/groups``, so the
    weight has ``groups * d * p`` elements; ``sample_bytes``: one sample's per-sample-conv buffer;
    ``threads`` only keys the cache (``linear_route`` reads the thread count itself).
    """
    T, weight = sum(Ts), groups * d * p
    unfold = UNFOLD_COST * B * groups * T * d
    linear = linear_route(B * groups, T, d, p)
    costs = {f"unfold+{name}": cost + unfold for name, cost in linear.alternatives.items()}
    chosen_linear = f"unfold+{linear.route}"
    costs.setdefault(chosen_linear, linear.flops + unfold)  # "outer" (T = 1) has no alternatives
    if sample_bytes <= max_bytes:  # else not even one sample's per-sample gradient fits
        costs[PER_SAMPLE_CONV] = (2.0 * B * weight * T * (1.0 + NARROW_OUTPUT / d)
                                  + PER_SAMPLE_GRAD_COST * B * weight * len(Ts))
    route = PER_SAMPLE_CONV if costs.get(PER_SAMPLE_CONV, math.inf) < costs[chosen_linear] else linear.route
    return route, tuple(costs.items())


def per_sample_conv_transpose_weight_grads(module, x, g, output_padding) -> torch.Tensor:
    """``[B, Cin, Cout/groups, *kernel]`` per-sample weight gradients of one transposed-conv call.

    One ``convolution_backward`` with the batch folded into the groups: input ``[1, B*Cin, *in]``,
    output grad ``[1, B*Cout, *out]``, groups ``B*groups``; the weight passed is only a shape.
    """
    B = x.shape[0]
    dtype = _common_dtype(x, g)
    x, g = x.to(dtype), g.to(dtype)
    weight_shape = (B * module.in_channels, module.out_channels // module.groups, *module.kernel_size)
    grads = torch.ops.aten.convolution_backward(
        g.reshape(1, B * module.out_channels, *g.shape[2:]), x.reshape(1, B * module.in_channels, *x.shape[2:]),
        torch.empty(weight_shape, dtype=dtype, device=x.device), None, module.stride, module.padding,
        module.dilation, True, output_padding, B * module.groups, [False, True, False])[1]
    return grads.view(B, *module.weight.shape)


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(LayerRule):
    """Rule for ``nn.ConvTranspose{1,2,3}d`` (stride, padding, output_padding or ``output_size``,
    dilation, groups; hook path only), with two routes for the weight, chosen per shape.

    A transposed convolution with weight ``W [Cin, Cout/groups, *k]`` is the adjoint of the
    ordinary convolution with the same ``W``, stride, padding, dilation and groups that maps
    ``[Cout, *out]`` to ``[Cin, *in]``. So a sample's weight gradient is that convolution's weight
    gradient with the roles swapped: its "input" is the output grad ``g`` (zero-padded by
    ``padding``) and its "output grad" is the layer input ``x``.

    * unfolded (``outer`` / ``ghost`` / ``instantiate``): per group, ``dW_b = X_b^T A_b`` with
      ``A_b = unfold(pad(g_b)) [prod(in), Cout/groups * prod(k)]`` (columns in the order of
      ``weight.view(Cin, -1)``) and ``X_b [prod(in), Cin/groups]``: the linear routes with
      ``T = prod(in)``. ``output_padding`` (or ``output_size=``) lengthens the output on the right
      past what the adjoint reads for ``in`` positions (into the zero padding, or positions no input
      reaches), so ``pad(g)`` is cropped there: the patches then have exactly ``prod(in)`` positions
      (uncropped, an output_padding >= stride, which torch allows below the dilation, would add one).
      On CUDA with ``implicit_patches`` a one-group layer's patches are read from ``g`` in place
      instead (``conv_ghost_norm`` / ``conv_instantiate_norm`` of the adjoint convolution, input
      ``g`` and output grad ``x``), where its output_padding is below the stride.
    * ``per-sample conv``: every sample's weight gradient from one transposed-convolution weight
      gradient with the batch folded into the groups (``per_sample_conv_transpose_weight_grads``),
      in chunks of samples whose gradients stay under ``MAX_EXTRA_BYTES``, then squared and summed.
      No unfolded buffer; it pays ``prod(weight)`` per sample instead. Measured on CPU it runs
      1.2-5x faster than the unfolded route where that would instantiate, loses to ``ghost`` on few
      positions and many channels, and to the unfolded route when each group's output row
      ``Cout/groups * prod(k)`` is short (~50 or less); ``_transpose_costs`` chooses per shape.

    The bias gradient is the sum of ``g_b`` over output positions (not the adjoint's bias column,
    a sum over input positions), added separately. Units: the squared norm of the gradient of the
    loss the user backpropagated, float32 [B], like every rule.
    """

    #: ``"per-sample conv"`` or ``"unfolded"`` overrides the cost model (tests and benchmarks).
    force_route: str | None = None

    def capture(self, module, args, kwargs, output):
        x = args[0].detach()
        _unbatched(module, x)
        return x

    def _dims(self, module, x):
        """``(T, d, p)``: input positions, patch width ``Cout/groups * prod(k)``, ``Cin/groups``."""
        d = module.out_channels // module.groups * math.prod(module.kernel_size)
        return x[0, 0].numel(), d, module.in_channels // module.groups

    def chunk_size(self, module, x, g) -> int:
        """Samples per chunk so the patches and the padded output grad stay under
        ``routes.max_extra_bytes`` (``MAX_EXTRA_BYTES``; more on CUDA)."""
        T, d, _ = self._dims(module, x)
        per_sample = 4 * (module.groups * T * d + g[0].numel())
        return max(1, min(x.shape[0], int(max_extra_bytes(x.device.type) // per_sample)))

    def conv_chunk_size(self, module, x, g) -> int:
        """Samples per grouped convolution so their per-sample gradients and the copies of input and
        output grad the convolution makes stay under ``routes.max_extra_bytes``."""
        return max(1, min(x.shape[0], int(max_extra_bytes(x.device.type) // self._sample_bytes(module, x, g))))

    def _sample_bytes(self, module, x, g) -> int:
        return 4 * (module.weight.numel() + x[0].numel() + g[0].numel())

    def output_padding(self, module, in_shape, g) -> list[int]:
        """The ``output_padding`` that makes ``in_shape`` (spatial) into ``g``'s spatial shape."""
        extra = []
        for i, n in enumerate(in_shape):
            k, s, dil, p = module.kernel_size[i], module.stride[i], module.dilation[i], module.padding[i]
            op = g.shape[2 + i] + 2 * p - (n - 1) * s - dil * (k - 1) - 1
            if not 0 <= op < max(s, dil):
                raise RuleError(
                    f"{type(module).__name__} produced an output of shape {tuple(g.shape)} from an input with "
                    f"spatial shape {tuple(in_shape)}, which its stride/padding/dilation cannot give; a subclass "
                    "whose forward changes the convolution needs its own rule")
            extra.append(op)
        return extra

    def patches(self, module, g, in_shape) -> torch.Tensor:
        """``g [B, Cout, *out]`` as the adjoint convolution's patches ``[B * groups, prod(in), d]``."""
        pads = []
        extra = self.output_padding(module, in_shape, g)
        for i in reversed(range(len(in_shape))):  # F.pad lists the last dim first
            p = module.padding[i]
            pads += [p, p - extra[i]]  # a negative right pad crops the output_padding positions
        a = unfold_patches(module, F.pad(g, pads) if any(pads) else g)
        assert a.shape[1] == math.prod(in_shape), (a.shape, in_shape)
        return a

    def _costs(self, module, calls) -> tuple[str, dict[str, float]]:
        x = calls[0][0]
        _, d, p = self._dims(module, x)
        Ts = tuple(c[0][0, 0].numel() for c in calls)
        sample_bytes = max(self._sample_bytes(module, c[0], c[1][0]) for c in calls)
        if routes.triton_kernels(x.device.type):
            # CUDA: the Triton kernels on the unfolded output grad, as for convolutions (see
            # ``conv_fuses``), not the grouped per-sample convolution the CPU-fitted model may pick.
            linear = linear_route(x.shape[0] * module.groups, sum(Ts), d, p, device_type=x.device.type)
            route, costs = linear.route, tuple(linear.alternatives.items())
        else:
            route, costs = _transpose_costs(x.shape[0], module.groups, Ts, d, p, sample_bytes, MAX_EXTRA_BYTES,
                                            torch.get_num_threads())
        if self.force_route == PER_SAMPLE_CONV:
            route = PER_SAMPLE_CONV
        elif self.force_route == "unfolded":
            route = linear_route(x.shape[0] * module.groups, sum(Ts), d, p, device_type=x.device.type).route
        elif self.force_route is not None:
            raise ValueError(f"force_route={self.force_route!r}: use None, {PER_SAMPLE_CONV!r} or 'unfolded'")
        return route, dict(costs)

    def norms(self, module, calls, tracked):
        B = calls[0][0].shape[0]
        total = torch.zeros(B, dtype=torch.float32, device=calls[0][0].device)
        if "bias" in tracked:
            bias = sum(grads[0].reshape(B, module.out_channels, -1).sum(dim=2, dtype=torch.float32)
                       for _, grads in calls)
            total = total + bias.square().sum(dim=1)
        if "weight" not in tracked:
            return total
        route = self._costs(module, calls)[0]
        if route == PER_SAMPLE_CONV:
            return total + self.per_sample_conv_norms(module, calls)
        if len(calls) == 1 and self._implicit(module, calls[0][0], calls[0][1][0], route):
            x, g = calls[0][0], calls[0][1][0]
            geometry = (module.kernel_size, module.stride, module.padding, module.dilation)
            # (the adjoint convolution's weight gradient: its input is g, its output grad x)
            return total + in_place_weight_norms(g, x, geometry, route)
        return total + self.unfolded_norms(module, calls)

    def _implicit(self, module, x, g, route: str) -> bool:
        """Whether the unfolded route's ``route`` reads the adjoint convolution's patches from ``g``
        in place (``implicit_patches``): one group, the Gram or instantiate route, and an
        ``output_padding`` below the stride (a longer one would give the adjoint an extra position
        the cropped patches leave out)."""
        return (module.groups == 1 and route in ("ghost", "instantiate") and implicit_patches(g.device)
                and all(op < s for op, s in zip(self.output_padding(module, x.shape[2:], g), module.stride)))

    def unfolded_norms(self, module, calls) -> torch.Tensor:
        """Per-sample squared weight-gradient norms [B] by the unfolded output grad and a linear route."""
        B = calls[0][0].shape[0]
        step = min(self.chunk_size(module, x, grads[0]) for x, grads in calls)
        out = []
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            a = [self.patches(module, grads[0][rows], x.shape[2:]) for x, grads in calls]
            g = [grouped_grad(module, x[rows]) for x, _ in calls]
            a, g = (a[0], g[0]) if len(calls) == 1 else (torch.cat(a, dim=1), torch.cat(g, dim=1))
            out.append(linear_norms(a, g, True, False).view(-1, module.groups).sum(dim=1))
        return _joined(out)

    def per_sample_conv_norms(self, module, calls) -> torch.Tensor:
        """Per-sample squared weight-gradient norms [B] from per-sample gradients (batch in the groups);
        the calls' per-sample gradients are summed before squaring."""
        B = calls[0][0].shape[0]
        step = min(self.conv_chunk_size(module, x, grads[0]) for x, grads in calls)
        paddings = [self.output_padding(module, x.shape[2:], grads[0]) for x, grads in calls]
        out = []
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            psg = None
            for (x, grads), op in zip(calls, paddings):
                part = per_sample_conv_transpose_weight_grads(module, x[rows], grads[0][rows], op).float()
                psg = part if psg is None else psg + part
            # psg is this loop's own buffer: squared in place, no second buffer of its size. (Not
            # vector_norm: its float32 accumulation lost 7e-5 relative on 2M-element gradients.)
            out.append(psg.square_().reshape(psg.shape[0], -1).sum(dim=1))
        return _joined(out)

    def grad_sums(self, module, calls, tracked):
        parts = [(x, grads[0], list(module.padding), self.output_padding(module, x.shape[2:], grads[0]))
                 for x, grads in calls]
        return conv_grad_sums(module, parts, tracked, transposed=True)

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        return self.plan_calls(module, [(ctx, [grad])], tracked)

    def plan_calls(self, module, calls, tracked) -> RoutePlan:
        # (the route is chosen for all the calls together, as norms does; several calls' output
        #  grads are unfolded together; the shapes shown are the first call's)
        route, costs = self._costs(module, calls)
        ctx, grad = calls[0][0], calls[0][1][0]
        if route == PER_SAMPLE_CONV:
            chunk = self.conv_chunk_size(module, ctx, grad)
            T = ctx[0, 0].numel()
            return RoutePlan(route, f"B={ctx.shape[0]} weight={tuple(module.weight.shape)} T={T} (transposed conv: "
                             f"batch folded into the groups, chunk {chunk})",
                             2.0 * ctx.shape[0] * module.weight.numel() * (T + 1),
                             float(self._sample_bytes(module, ctx, grad) * chunk), alternatives=costs)
        T, d, p = self._dims(module, ctx)
        plan = linear_route(ctx.shape[0] * module.groups, T, d, p, device_type=ctx.device.type)
        if len(calls) == 1 and self._implicit(module, ctx, grad, route):
            plan.route = f"implicit-{plan.route}"
            plan.shape = f"{plan.shape} (transposed conv: output grad's patches read in place)"
            plan.alternatives = costs
            return _with_copies(plan, grad, ctx)
        chunk = self.chunk_size(module, ctx, grad)
        plan.extra_bytes += 4.0 * chunk * (module.groups * T * d + grad[0].numel())
        plan.shape = f"{plan.shape} (transposed conv: unfolded output grad, chunk {chunk})"
        plan.alternatives = costs
        return plan

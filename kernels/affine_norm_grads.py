"""Per-sample gradients of a LayerNorm's or RMSNorm's affine parameters in one pass.

    x_hat[b, r] = (x[b, r] - mean) / sqrt(var + eps)      (LayerNorm; biased var over d)
                =  x[b, r] / sqrt(mean(x[b, r]^2) + eps)  (RMSNorm, ``RMS``)
    weight[b]   = sum_r x_hat[b, r] * g[b, r]             [B, d] float32
    bias[b]     = sum_r g[b, r]                           [B, d] float32 (``WITH_BIAS``)

(``ROUND_X_HAT``: x_hat rounded to x's dtype first, as Hugging Face's Llama RMSNorm computes it.)

``x, g [B, R, d]`` (float32/float16/bfloat16, any strides). The PyTorch path (``layers/norm.py``)
writes ``x_hat`` in float32, multiplies it by ``g`` in place and reduces: about five passes over
an activation-sized float32 tensor and six launches. Here each row is read once from ``x`` and
once from ``g``, normalised in registers (float32, the mean subtracted before the variance is
taken) and accumulated; no activation-sized tensor is written.

Grid: ``(B, n_blocks)``: program (b, k) takes rows ``k * rows_per_program ...`` of sample b, one
whole row (``BLOCK_D >= d``) at a time, and writes its partial sums to ``partial [B, n_blocks,
d]``; the wrapper adds the blocks in a fixed order (deterministic, unlike atomics). ``n_blocks``
is chosen so the grid has a few programs per SM even for a small batch. Rows up to
``MAX_D`` = 8192 wide; the norm rule keeps its PyTorch path for wider ones. Not autotuned: the
row width fixes the config (``config_for``), and a row-streaming kernel has nothing else to tune.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_x_g, sm_count

#: Widest row (``d``) one program holds in registers (16 warps, 16 float32 per thread per tensor).
MAX_D = 8192


# (BLOCK_D, warps): at most 16 float32 per thread per row tensor, so nothing spills. Not
# autotuned: the one config whose BLOCK_D holds the row is the config (``config_for``).
_CONFIGS = [triton.Config({"BLOCK_D": width}, num_warps=warps) for width, warps in
            ((256, 2), (1024, 4), (4096, 8), (MAX_D, 16))]


def config_for(d: int) -> triton.Config:
    """The config that serves rows of width ``d``: the narrowest BLOCK_D that holds them (under
    the interpreter the next power of two, one warp)."""
    if INTERPRET:
        return triton.Config({"BLOCK_D": triton.next_power_of_2(max(d, 1))}, num_warps=1)
    return next(c for c in _CONFIGS if c.kwargs["BLOCK_D"] >= d)


@triton.jit
def _round_to_bfloat16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32: the bits of
    ``x.to(torch.bfloat16)``. Written out because the interpreter's float32 -> bfloat16 cast
    truncates (and its "rtne" mode carries no overflow into the exponent)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _affine_norm_grads_kernel(
    # inputs: x [B, R, d], g [B, R, d]
    x_ptr, g_ptr,
    # outputs, float32, contiguous: weight_part [B, n_blocks, d], bias_part [B, n_blocks, d]
    weight_ptr, bias_ptr,
    R, d, rows_per_program, eps,
    stride_xb, stride_xr, stride_xd,
    stride_gb, stride_gr, stride_gd,
    RMS: tl.constexpr, WITH_BIAS: tl.constexpr, ROUND_X_HAT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    cols64 = cols.to(tl.int64)
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = block * rows_per_program
    last = tl.minimum(first + rows_per_program, R)
    for r in range(first, last):
        r64 = tl.cast(r, tl.int64)
        x = tl.load(x_ptr + b * stride_xb + r64 * stride_xr + cols64 * stride_xd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * stride_gb + r64 * stride_gr + cols64 * stride_gd, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            x_hat = x / tl.sqrt_rn(tl.sum(x * x, axis=0) / d + eps)
        else:
            centred = tl.where(mask, x - tl.sum(x, axis=0) / d, 0.0)
            x_hat = centred / tl.sqrt_rn(tl.sum(centred * centred, axis=0) / d + eps)
        if ROUND_X_HAT:  # (Hugging Face's Llama RMSNorm: x_hat cast back to the input dtype)
            if x_ptr.dtype.element_ty == tl.bfloat16:
                x_hat = _round_to_bfloat16(x_hat)
            else:
                x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        acc_w += x_hat * g
        if WITH_BIAS:
            acc_b += g
    out = (b * n_blocks + block) * d + cols64
    tl.store(weight_ptr + out, acc_w, mask=mask)
    if WITH_BIAS:
        tl.store(bias_ptr + out, acc_b, mask=mask)


def _blocks(B: int, R: int, device: torch.device) -> int:
    """Row blocks per sample: enough programs for ~4 per SM, each at least 8 rows."""
    if INTERPRET or device.type != "cuda":
        return 1 if R <= 8 else 2  # (two blocks under the interpreter: the tests cover the block sum)
    wanted = triton.cdiv(4 * sm_count(device), max(B, 1))
    return max(1, min(wanted, triton.cdiv(R, 8)))


def affine_norm_grads_triton(x: torch.Tensor, g: torch.Tensor, rms: bool, eps: float, with_bias: bool,
                             round_x_hat: bool = False):
    """``(weight [B, d], bias [B, d])`` float32; see the module docstring. No copies of x or g."""
    op = "affine_norm_grads"
    device = check_x_g(op, x, g)
    B, R, d = x.shape
    if d > MAX_D:
        raise ValueError(f"divebatch.{op}: rows of d={d} > {MAX_D} do not fit one program; "
                         "use divebatch.reference.affine_norm_grads (the norm rule does so itself)")
    n_blocks = _blocks(B, R, device)
    # Every (sample, block) row is stored by its program (zeros where a block has no rows), so
    # the partials need no zero fill; only an empty launch leaves them unwritten.
    launch = B > 0 and R > 0 and d > 0
    alloc = torch.empty if launch else torch.zeros
    weight = alloc((B, n_blocks, d), dtype=torch.float32, device=device)
    bias = alloc((B, n_blocks, d) if with_bias else (1, 1, 1), dtype=torch.float32, device=device)
    if launch:
        rows_per_program = triton.cdiv(R, n_blocks)
        config = config_for(d)
        _affine_norm_grads_kernel[(B, n_blocks)](
            x, g, weight, bias,
            R, d, rows_per_program, float(eps),
            x.stride(0), x.stride(1), x.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            RMS=bool(rms), WITH_BIAS=bool(with_bias), ROUND_X_HAT=bool(round_x_hat) and x.dtype != torch.float32,
            BLOCK_D=config.kwargs["BLOCK_D"],
            num_warps=config.num_warps,
        )
    weight = weight[:, 0] if n_blocks == 1 else weight.sum(dim=1)
    if not with_bias:
        return weight, torch.zeros_like(weight)
    return weight, (bias[:, 0] if n_blocks == 1 else bias.sum(dim=1))

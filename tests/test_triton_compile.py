"""Every Triton kernel compiles for sm_80 and sm_90, in each input dtype, without register spills.

No GPU is needed: ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...))``
runs the whole pipeline down to PTX and a cubin with the ptxas that ships in the triton wheel.
It must run in a process *without* ``TRITON_INTERPRET`` (the interpreter replaces
``@triton.jit``), so the compilation happens in a subprocess: this file run as a script
(``python tests/test_triton_compile.py --child OUT.json``) with one worker process per core.

Per (kernel, dtype, arch) and layout, every autotune config the kernel would try is compiled
(each kernel's ``early_config_prune`` picks a list by operand width, 16-bit or float32, and by
layout): "contig" has unit inner strides (constexpr 1, as the JIT specialises them) and 16-byte
aligned pointers and sizes; "strided" has every stride a runtime value and no alignment (the
worst case: a non-unit inner stride; such inputs get their own, smaller-tile config list).
float16 (same code as bfloat16 but for the MMA type) and the dot-free outer kernel compile only
the first config of each list; ``DIVEBATCH_COMPILE_SWEEP=all`` compiles everything and
``DIVEBATCH_COMPILE_SWEEP=quick`` only the first config of every list (248 compilations).
The wheel's ``cuobjdump --dump-resource-usage`` gives registers and the stack / local bytes;
where those are non-zero, spill stores / loads are counted as the ``STL`` / ``LDL`` instructions
of ``cuobjdump -sass`` (Triton kernels have no local arrays; a spill needs a stack frame), with
the loop depth of the deepest one. A spill fails the test unless listed in ``ACCEPTED_SPILLS``
with a reason, or, in a recurrent scan kernel, a small one outside the loops nested in the step
loop (``SCAN_SPILL_BYTES``: at most a reload per time step).
The PTX is also read for the two premises of the kernels' speed: every ``tl.dot`` runs on tensor
cores (``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80) and, for contiguous inputs, the
loads are the asynchronous copies (``cp.async``) of Triton's software pipeline. The TTGIR is
read for the sm_90 pipeline's safety and cost: every shared-memory buffer an asynchronous
warpgroup MMA reads has ``num_stages`` slots (with fewer, the next loads overwrite a tile the MMA
is still reading: the H200's large-shape deviations, triton-lang/triton#6691), and the 16-bit dot
loops read no tile into registers.
Shared memory above a GPU's limit is not an error (the autotuner drops such a config on that GPU
at launch) as long as some config of the (kernel, dtype, arch) fits.

Run: ``pytest tests/test_triton_compile.py -s`` (the table goes to stdout). 436 compilations (72
of them the recurrent scans: the LSTM with a projection, the GRU and the tanh RNN, forward and
backward), ~130 s of CPU with a cold Triton cache (~70 s wall on two cores), ~8 s when the cache
(``~/.triton/cache`` or ``$TRITON_CACHE_DIR``) is warm.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
#: Max dynamic shared memory per block (opt-in), bytes: A100 (sm_80), H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}

#: (kernel, dtype, arch, config label, variant) -> why this spill is acceptable.
_WIDE_STRIDED_ROWS = ("a norm row of 4097-8192 elements with an inner stride != 1 (rare: norm inputs are "
                      "contiguous in their last dim): one 64-bit address per element, 16 per thread per "
                      "tensor at the 128-register cap of 16 warps; correct, slower")
ACCEPTED_SPILLS: dict[tuple[str, str, int, str, str], str] = {
    ("_affine_norm_grads_kernel", dtype, arch, "BLOCK_D=8192,w16,s3", "strided"): _WIDE_STRIDED_ROWS
    for dtype in ("fp32", "bf16") for arch in (80, 90)
}

#: Spills accepted by rule, not by key: in a recurrent scan kernel (``SCAN_PREFIX``), local stores and
#: loads of at most ``SCAN_SPILL_BYTES`` of stack that lie outside every loop nested in the step loop
#: (loop depth <= 1 in the SASS, ``spill_depth``): at most one reload per time step, never per tile or
#: element. Why: ptxas parks one or two long-lived 64-bit values (row offsets) in a stack slot at
#: 64-168 of 255 registers, and which (kernel, dtype, arch) it does so for changes with any edit.
SCAN_SPILL_BYTES = 32

_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# --------------------------------------------------------------------------- child process
def _load_kernels():
    """The kernels package from this checkout (``kernels/``), importable without the install."""
    name = "_divebatch_kernels_compile_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: The recurrent scans compile once per cell (its code differs most): the LSTM with a projection,
#: the GRU, the tanh RNN.
_SCAN_MODES = (("LSTM", 0), ("GRU", 1), ("RNN_TANH", 2))


def _specs():
    """How to build a signature for each kernel: pointer dtypes, inner strides, fixed constexprs."""
    specs = {
        "_ghost_norm_kernel": dict(
            module="ghost_norm",
            pointers={"a_ptr": None, "g_ptr": None, "weight_sq_ptr": "fp32", "colsum_ptr": "fp32"},
            tensor_args=("a_ptr", "g_ptr"),
            inner_strides=("stride_ad", "stride_gp"),
            aligned_ints=("d", "p", "stride_ab", "stride_at", "stride_gb", "stride_gt"),
            constexprs={"WITH_BIAS": True, "IMPLICIT": False, "PADDED": False, "DEPTH": False, "WIDE": True},
        ),
        # The 128 x 256 tiles of sm_90 (a 64 x 128 one elsewhere), Grams through a scratch slot.
        "_ghost_norm_wide_kernel": dict(
            module="ghost_norm", prune="_WIDE_PRUNE",
            pointers={"a_ptr": None, "g_ptr": None, "weight_sq_ptr": "fp32", "colsum_ptr": "fp32",
                      "scratch_ptr": "fp32"},
            tensor_args=("a_ptr", "g_ptr"),
            inner_strides=("stride_ad", "stride_gp"),
            aligned_ints=("d", "p", "stride_ab", "stride_at", "stride_gb", "stride_gt"),
            constexprs={"WITH_BIAS": True},
        ),
        "_instantiate_norm_kernel": dict(
            module="instantiate_norm",
            pointers={"a_ptr": None, "g_ptr": None, "weight_sq_ptr": "fp32", "bias_sq_ptr": "fp32",
                      "wgrad_ptr": "fp32"},
            tensor_args=("a_ptr", "g_ptr"),
            inner_strides=("stride_ad", "stride_gp"),
            aligned_ints=("d", "p", "stride_ab", "stride_at", "stride_gb", "stride_gt"),
            constexprs={"WITH_BIAS": True, "ATOMIC_WGRAD": False, "IMPLICIT": False, "PADDED": False, "DEPTH": False,
                        "WIDE": True},
        ),
        # The convolution's patches read from its input in place (IMPLICIT: pointer loads by computed
        # addresses, never TMA); the strided layout, as the wrapper keys it, and a channels-last
        # input (CHANNELS_FASTEST, channel and output-channel strides 1, sizes and strides divisible
        # by 16). A padded 2-d one with int32 in-sample offsets (the common case) and a padded 3-d
        # one with int64 offsets (the most registers).
        **{f"_instantiate_norm_kernel[implicit{suffix}]": dict(
            module="instantiate_norm", function="_instantiate_norm_kernel", variants=("strided", *LAYOUTS),
            pointers={"a_ptr": None, "g_ptr": None, "weight_sq_ptr": "fp32", "bias_sq_ptr": "fp32",
                      "wgrad_ptr": "fp32"},
            tensor_args=("a_ptr", "g_ptr"),
            inner_strides=("stride_ad", "stride_gp"),
            aligned_ints=(),
            constexprs={"WITH_BIAS": False, "ATOMIC_WGRAD": False, "IMPLICIT": True, "PADDED": True, "DEPTH": depth,
                        "WIDE": depth},
        ) for suffix, depth in (("", False), ("-3d-wide", True))},
        # The Grams of a convolution's patches read from its input in place (as above).
        **{f"_ghost_norm_kernel[implicit{suffix}]": dict(
            module="ghost_norm", function="_ghost_norm_kernel", variants=("strided", *LAYOUTS),
            pointers={"a_ptr": None, "g_ptr": None, "weight_sq_ptr": "fp32", "colsum_ptr": "fp32"},
            tensor_args=("a_ptr", "g_ptr"),
            inner_strides=("stride_ad", "stride_gp"),
            aligned_ints=(),
            constexprs={"WITH_BIAS": False, "IMPLICIT": True, "PADDED": True, "DEPTH": depth, "WIDE": depth},
        ) for suffix, depth in (("", False), ("-3d-wide", True))},
        "_outer_norm_kernel": dict(
            module="outer_norm",
            pointers={"a_ptr": None, "g_ptr": None, "weight_sq_ptr": "fp32", "bias_sq_ptr": "fp32"},
            tensor_args=("a_ptr", "g_ptr"),
            inner_strides=("stride_ad", "stride_gp"),
            aligned_ints=("d", "p", "stride_ab", "stride_gb"),
            constexprs={"WITH_BIAS": True},
        ),
        **{f"_recurrent_scan_kernel[{mode}]": dict(
            module="recurrent_scan", function="_recurrent_scan_kernel",
            pointers={**dict.fromkeys(("gi_ptr", "w_ptr", "b_ptr", "wr_ptr", "out_ptr", "cells_ptr", "saved_ptr")),
                      "len_ptr": "i64", "h_scr": "fp32", "c_scr": "fp32", "m_scr": "fp32"},
            tensor_args=("gi_ptr",),
            inner_strides=("stride_gg",),
            aligned_ints=("H", "P", "stride_gb", "stride_gt", "stride_w0", "stride_r0"),
            constexprs={"MODE": mode_id, "REVERSE": False, "HAS_BIAS": True, "HAS_LENGTHS": True,
                        "PROJECTED": mode == "LSTM"},
        ) for mode, mode_id in _SCAN_MODES},
        **{f"_recurrent_scan_backward_kernel[{mode}]": dict(
            module="recurrent_scan", function="_recurrent_scan_backward_kernel", prune="_BACKWARD_PRUNE",
            pointers={**dict.fromkeys(("gout_ptr", "w_ptr", "h0_ptr", "c0_ptr", "wr_ptr", "out_ptr", "cells_ptr",
                                       "saved_ptr", "ggi_ptr", "ggh_ptr", "gproj_ptr")),
                      "len_ptr": "i64", "dh_scr": "fp32", "dc_scr": "fp32"},
            tensor_args=("gout_ptr",),
            inner_strides=("stride_op", "stride_yp", "stride_ch", "stride_sk"),
            aligned_ints=("H", "P", "stride_ob", "stride_ot", "stride_yb", "stride_yt", "stride_cb", "stride_ct",
                          "stride_sb", "stride_st", "stride_w0", "stride_r0"),
            constexprs={"MODE": mode_id, "REVERSE": True, "HAS_LENGTHS": True, "PROJECTED": mode == "LSTM"},
        ) for mode, mode_id in _SCAN_MODES},
        "_affine_norm_grads_kernel": dict(
            module="affine_norm_grads", configs="_CONFIGS",  # not autotuned: the row width picks the config
            pointers={"x_ptr": None, "g_ptr": None, "weight_ptr": "fp32", "bias_ptr": "fp32"},
            tensor_args=("x_ptr", "g_ptr"),
            inner_strides=("stride_xd", "stride_gd"),
            aligned_ints=("d", "stride_xb", "stride_xr", "stride_gb", "stride_gr"),
            floats=("eps",),
            constexprs={"RMS": False, "WITH_BIAS": True, "ROUND_X_HAT": True},  # (all the code there is)
        ),
        "_group_norm_grads_kernel": dict(
            module="group_norm_grads", configs="_CONFIGS",  # not autotuned: the positions pick the config
            pointers={"x_ptr": None, "g_ptr": None, "weight_ptr": "fp32", "bias_ptr": "fp32"},
            tensor_args=("x_ptr", "g_ptr"),
            inner_strides=("stride_xs", "stride_gs"),
            aligned_ints=("S", "stride_xb", "stride_xc", "stride_gb", "stride_gc"),
            floats=("eps",),
            constexprs={"WITH_BIAS": True},
        ),
        "_channel_norm_grads_kernel": dict(
            module="channel_norm_grads", configs="_CONFIGS",  # not autotuned: layout and positions pick it
            pointers={"x_ptr": None, "g_ptr": None, "mean_ptr": "fp32", "rstd_ptr": "fp32", "weight_ptr": "fp32",
                      "bias_ptr": "fp32"},
            tensor_args=("x_ptr", "g_ptr"),
            inner_strides=("stride_xs", "stride_gs"),
            aligned_ints=("S", "stride_xb", "stride_xc", "stride_gb", "stride_gc"),
            constexprs={"WITH_BIAS": True},
        ),
        "_embedding_norm_kernel": dict(
            module="embedding_norm",
            pointers={"idx_ptr": "i64", "g_ptr": None, "out_ptr": "fp32"},
            tensor_args=("g_ptr",),
            inner_strides=("stride_it", "stride_gp"),
            aligned_ints=("p", "stride_ib", "stride_gb", "stride_gt"),
            constexprs={},
        ),
    }
    # A convolution's unfolded patches and output grad as positions-last views (positions
    # contiguous), positions a multiple of 16 or not: what layers.conv.rows_layout decides by.
    for kernel in ("_ghost_norm_kernel", "_instantiate_norm_kernel"):
        specs[f"{kernel}[unfolded]"] = dict(specs[kernel], function=kernel, variants=tuple(UNFOLDED_LAYOUTS),
                                             dtypes=("bf16",), first_config_only=True)
    return specs


#: The layout variants of the implicit convolution kernels beyond ``strided``: what the JIT is given
#: for a channels-last input (channel stride 1, sizes and strides divisible by 16) with a channels-last
#: output grad (``channels-last``), or with an NCHW output grad whose positions come in multiples of 16
#: (``channels-last-x``: the engine's channels-last copy of an NCHW input beside its own output grad,
#: ``layers.conv.vector_layouts``; rows contiguous along positions).
LAYOUTS = {
    "channels-last": dict(constexprs={"CHANNELS_FASTEST": True}, unit_ints=("stride_xc", "stride_gp"),
                          aligned_ints=("XC", "d", "p", "stride_ab", "stride_gb", "stride_gt", "stride_xd",
                                        "stride_xh", "stride_xw")),
    "channels-last-x": dict(constexprs={"CHANNELS_FASTEST": True}, unit_ints=("stride_xc", "stride_gt"),
                            aligned_ints=("T", "XC", "d", "p", "stride_ab", "stride_gb", "stride_gp", "stride_xd",
                                          "stride_xh", "stride_xw")),
}

#: The plain dot kernels on positions-last views (a convolution's unfolded patches and output grad:
#: inner strides 1 along positions, T along columns), with ``T`` divisible by 16 or not.
UNFOLDED_LAYOUTS = {
    "positions-last": dict(constexprs={}, unit_ints=("stride_at", "stride_gt"),
                           aligned_ints=("T", "d", "p", "stride_ab", "stride_gb", "stride_ad", "stride_gp")),
    "positions-last-odd-T": dict(constexprs={}, unit_ints=("stride_at", "stride_gt"),
                                 aligned_ints=("d", "p", "stride_ab", "stride_gb")),
}


def _layout(variant: str) -> dict | None:
    """The JIT's view of a named layout variant (None for ``contig`` and ``strided``)."""
    return LAYOUTS.get(variant) or UNFOLDED_LAYOUTS.get(variant)


def _config_label(cfg) -> str:
    meta = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{meta},w{cfg.num_warps},s{cfg.num_stages}"


#: Kernels and dtypes for which only the first config of each list is compiled: float16 generates
#: the same code as bfloat16 (another MMA type), and the outer kernel has no dot (<100 registers).
_FIRST_CONFIG_ONLY_DTYPES = ("fp16",)
_FIRST_CONFIG_ONLY_KERNELS = ("_outer_norm_kernel",)


def _configs(kernel: str, dtype: str, variant: str, arch: int):
    """The autotune configs the kernel would try for inputs of ``dtype`` in the ``variant`` layout on
    compute capability ``arch``."""
    import torch

    K = _load_kernels()
    spec = _specs()[kernel]
    module = importlib.import_module(f"{K.__name__}.{spec['module']}")
    autotuner = getattr(module, spec.get("function", kernel))
    if "configs" in spec:  # a plain @triton.jit kernel launched with one config of a module-level list
        return autotuner, list(getattr(module, spec["configs"]))
    tdtype = getattr(torch, _TORCH_DTYPE_NAMES[dtype])
    named = {n: torch.empty(0, dtype=tdtype) for n in spec["tensor_args"]}
    named.update({n: 1 if variant == "contig" else 2 for n in spec["inner_strides"]})
    prune = getattr(module, spec.get("prune", "_PRUNE"), {})
    constexprs = dict(spec["constexprs"], **(_layout(variant) or {}).get("constexprs", {}))
    return autotuner.fn, K._common.configs_for(autotuner.configs, prune, named, arch, **constexprs)


def _sweep() -> str:
    """``DIVEBATCH_COMPILE_SWEEP``: default, quick or all (see the module docstring)."""
    sweep = os.environ.get("DIVEBATCH_COMPILE_SWEEP", "default")
    if sweep not in ("default", "quick", "all"):
        raise ValueError(f"DIVEBATCH_COMPILE_SWEEP={sweep!r} is not one of default, quick, all")
    return sweep


def _jobs():
    sweep = _sweep()
    jobs = []
    for kernel, spec in _specs().items():
        for dtype in spec.get("dtypes", DTYPES):
            for variant in spec.get("variants", ("contig", "strided")):
                for arch in ARCHS:
                    _, configs = _configs(kernel, dtype, variant, arch)
                    first_only = (dtype in _FIRST_CONFIG_ONLY_DTYPES or kernel in _FIRST_CONFIG_ONLY_KERNELS
                                  or spec.get("first_config_only", False))
                    if sweep == "quick" or (sweep == "default" and first_only):
                        configs = configs[:1]
                    jobs += [(kernel, dtype, arch, i, variant) for i in range(len(configs))]
    return jobs


def _resource_usage(cubin: bytes, name: str) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run([str(tool), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        line = next((ln for ln in usage.splitlines() if "REG:" in ln), "")
        reg = re.search(r"REG:(\d+)", line)
        stack = re.search(r"STACK:(\d+)", line)
        local = re.search(r"LOCAL:(\d+)", line)
        record = {
            "regs": int(reg.group(1)) if reg else -1,
            "stack": int(stack.group(1)) if stack else -1,
            "local": int(local.group(1)) if local else -1,
            "spill_stores": 0,
            "spill_loads": 0,
            "usage_line": line.strip(),
        }
        # Spilled registers live in the local-memory stack frame: with STACK and LOCAL both 0 there
        # is nowhere to spill to. Otherwise count the local stores / loads in the SASS (~1 s per
        # kernel, hence only then, or always with DIVEBATCH_COMPILE_SASS=1); Triton kernels have
        # no local arrays, so every STL / LDL is a spill.
        if record["stack"] != 0 or record["local"] != 0 or os.environ.get("DIVEBATCH_COMPILE_SASS") == "1":
            sass = subprocess.run([str(tool), "-sass", path], capture_output=True, text=True, check=True).stdout
            record["spill_stores"] = len(re.findall(r"\bSTL(?:\.[A-Z0-9]+)*\s", sass))
            record["spill_loads"] = len(re.findall(r"\bLDL(?:\.[A-Z0-9]+)*\s", sass))
            record["spill_depth"] = _spill_loop_depth(sass)
    finally:
        os.unlink(path)
    return record


def _spill_loop_depth(sass: str) -> int:
    """The deepest loop nesting of any local store / load (``STL``/``LDL``) in ``sass``: every backward
    branch ``BRA`` from address a to t < a closes a loop [t, a]; an instruction's depth is the number
    of such intervals holding its address (0: straight-line code)."""
    loops, spills = [], []
    for line in sass.splitlines():
        at = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if not at:
            continue
        address, text = int(at.group(1), 16), at.group(2)
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
        if re.search(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\s", text):
            spills.append(address)
    return max((sum(lo <= a <= hi for lo, hi in loops) for a in spills), default=0)


_SSA_DEF = re.compile(r"^\s*(%[\w#.]+)(?::\d+)?\s*=\s*(\S+)\s*(.*)$")
_SSA_NAME = re.compile(r"%[\w#.]+")


def _shared_buffers(ttgir: str) -> tuple[dict[str, int], set[str], set[str]]:
    """``(slots, async_mma_buffers, register_read_buffers)`` of a TTGIR listing: each mutable
    shared-memory allocation's number of slots (pipeline stages), the allocations an asynchronous
    warpgroup MMA (sm_90 ``warp_group_dot`` with ``isAsync``) reads, and those ``ttg.local_load``
    reads into registers, each traced back through its views (slot index, transpose, slice)."""
    slots: dict[str, int] = {}
    parent: dict[str, str] = {}
    dot_operands: set[str] = set()
    register_reads: set[str] = set()
    for line in ttgir.splitlines():
        match = _SSA_DEF.match(line)
        if not match:
            continue
        name, op, rest = match.groups()
        source = _SSA_NAME.match(rest)
        if op == "ttg.local_alloc" and "mutable" in rest:
            shape = re.search(r"!ttg\.memdesc<((?:\d+x)+)[a-z]", rest)
            if shape:
                dims = shape.group(1).rstrip("x").split("x")
                slots[name] = int(dims[0]) if len(dims) >= 3 else 1
        elif op.startswith("ttg.memdesc_") and source:  # a view (slot index, transpose, slice)
            parent[name] = source.group(0)
        elif op == "ttg.local_load" and source:
            register_reads.add(source.group(0))
        elif op == "ttng.warp_group_dot" and "isAsync = true" in rest:
            dot_operands.update(_SSA_NAME.findall(rest.split("{")[0])[:2])

    def root(value: str) -> str:
        while value in parent:
            value = parent[value]
        return value

    return slots, {root(v) for v in dot_operands} & slots.keys(), {root(v) for v in register_reads}


def async_mma_buffer_hazards(ttgir: str, num_stages: int) -> list[str]:
    """Shared-memory buffers that an asynchronous warpgroup MMA reads while the software pipeline
    may already be refilling them.

    The pipeline loads ``num_stages - 1`` iterations ahead and lets one MMA stay in flight past the
    next iteration's start, so a buffer an async MMA reads needs ``num_stages`` slots; with fewer, the
    copy for iteration k + num_stages - 1 overwrites the slot MMA k is still reading (a race: wrong
    sums now and then, more often the more programs run). Triton 3.7 allocates one slot too few when
    the loaded tile is also read into registers (e.g. ``tl.sum`` of a tile that also feeds ``tl.dot``;
    triton-lang/triton#6691), so that co-use is named in the finding. Returns one line per hazard.
    """
    slots, mma_buffers, read_into_registers = _shared_buffers(ttgir)
    hazards = []
    for alloc in sorted(mma_buffers):
        if slots[alloc] < num_stages:
            also = ", also read into registers" if alloc in read_into_registers else ""
            hazards.append(f"{alloc}: {slots[alloc]} slot(s) for num_stages={num_stages}{also}")
    return hazards


def mma_tiles_read_into_registers(ttgir: str) -> list[str]:
    """The shared-memory buffers an asynchronous MMA reads that are also loaded into registers (a
    second read of every tile, in every program that runs the loop)."""
    _, mma_buffers, read_into_registers = _shared_buffers(ttgir)
    return sorted(mma_buffers & read_into_registers)


def _compile_one(job) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, dtype, arch, index, variant = job
    spec = _specs()[kernel]
    K = _load_kernels()
    fn, configs = _configs(kernel, dtype, variant, arch)
    cfg = configs[index]
    upcast, precision = K._common.dot_options(getattr(torch, _TORCH_DTYPE_NAMES[dtype]))

    constexprs = dict(spec["constexprs"], **cfg.kwargs)
    layout = _layout(variant)
    if layout:
        constexprs.update(layout["constexprs"])
    if "UPCAST" in fn.arg_names:
        constexprs.update(UPCAST=upcast, DOT_PRECISION=precision)
    if "TMA_OK" in fn.arg_names:  # (the wrappers' tma_ok: aligned unit-stride inputs, i.e. "contig")
        constexprs["TMA_OK"] = variant == "contig"
    if "COLUMNS_IN_THREADS" in fn.arg_names:  # (ghost_norm.columns_in_threads: a 16-bit g of unit inner stride)
        unit_gp = ((variant == "contig" and "stride_gp" in spec["inner_strides"])
                   or bool(layout and "stride_gp" in layout["unit_ints"]))
        constexprs["COLUMNS_IN_THREADS"] = unit_gp and dtype != "fp32"
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in spec["pointers"]:
            signature[arg] = "*" + (spec["pointers"][arg] or dtype)
            if variant == "contig" or layout:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif layout and arg in layout["unit_ints"]:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in spec.get("floats", ()):
            signature[arg] = "fp32"
        elif arg in spec["inner_strides"] and variant == "contig":
            signature[arg] = "constexpr"  # the JIT specialises an int argument equal to 1
            constexprs[arg] = 1
        else:
            signature[arg] = "i32"
            if (variant == "contig" and arg in spec["aligned_ints"]
                    or layout and arg in layout["aligned_ints"]):
                attrs[(i,)] = [["tt.divisibility", 16]]
    record = {"kernel": kernel, "dtype": dtype, "arch": arch, "config": _config_label(cfg), "variant": variant}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = compiled.asm.get("ptx", "")
        cubin = compiled.asm.get("cubin", b"")
        record.update(
            has_ptx=isinstance(ptx, str) and f".entry {spec.get('function', kernel)}" in ptx,
            has_cubin=isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF",
            shared=int(compiled.metadata.shared),
            # Tensor-core instructions: Hopper's warpgroup MMA, and the warp-level MMA of sm_80.
            wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
            mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
            # Asynchronous global->shared copies: the software pipeline of num_stages > 1.
            cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
            # Loads from global memory into registers: outside the software pipeline.
            ld_global=len(re.findall(r"\bld\.global\b", ptx)),
            # Hopper's tensor memory accelerator: bulk copies by descriptor (the USE_TMA configs).
            tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
            # Atomics with memory ordering (tl.atomic_add's default, acq_rel): each costs a fence
            # (MEMBAR.ALL.GPU) and an L1 invalidation (CCTL.IVALL) around it in SASS.
            ordered_atomics=len(re.findall(r"\b(?:atom|red)\.[\w.:]*\b(?:acq_rel|acquire|release)\b", ptx)),
            atomics=len(re.findall(r"\b(?:atom|red)\.global\b", ptx)),
            mma_buffer_hazards=async_mma_buffer_hazards(compiled.asm.get("ttgir", ""), cfg.num_stages),
            mma_tiles_in_registers=mma_tiles_read_into_registers(compiled.asm.get("ttgir", "")),
        )
        if record["has_cubin"]:
            record.update(_resource_usage(cubin, kernel))
    except Exception as exc:  # noqa: BLE001 - reported, the parent test fails on it
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return record


def _child(out_path: str) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    assert not os.environ.get("TRITON_INTERPRET"), "compile in a process without TRITON_INTERPRET"
    jobs = _jobs()
    workers = max(1, min(len(jobs), os.cpu_count() or 1, int(os.environ.get("DIVEBATCH_COMPILE_WORKERS", "8"))))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        records = list(pool.map(_compile_one, jobs))
    Path(out_path).write_text(json.dumps(records, indent=1))


# --------------------------------------------------------------------------- the tests
def _spill(r: dict) -> bool:
    return r.get("spill_stores", 0) > 0 or r.get("spill_loads", 0) > 0 or r.get("stack", 0) > 0


def _table(records: list[dict]) -> str:
    head = (f"{'kernel':26} {'dt':4} {'sm':>3} {'variant':8} {'regs':>4} {'stack':>5} {'stl':>4} {'ldl':>4} "
            f"{'depth':>5} {'smem':>7}  config")
    rows = [head]
    for r in records:
        if "error" in r:
            rows.append(f"{r['kernel']:26} {r['dtype']:4} {r['arch']:>3} {r['variant']:8} ERROR {r['error'][:80]}")
            continue
        rows.append(f"{r['kernel']:26} {r['dtype']:4} {r['arch']:>3} {r['variant']:8} {r.get('regs', -1):>4} "
                    f"{r.get('stack', -1):>5} {r.get('spill_stores', -1):>4} {r.get('spill_loads', -1):>4} "
                    f"{r.get('spill_depth', 0):>5} {r.get('shared', -1):>7}  {r['config']}")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton_compile") / "records.json"
    # No interpreter, and every config (DIVEBATCH_TRITON_AUTOTUNE=0 would keep only the first).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DIVEBATCH_TRITON_AUTOTUNE")}
    env["DIVEBATCH_TRITON_UNVERIFIED_CONFIGS"] = "1"  # (the configs not yet run on a GPU compile too)
    proc = subprocess.run([sys.executable, __file__, "--child", str(out)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"compile subprocess failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    recs = json.loads(out.read_text())
    print("\n" + _table(recs))
    return recs


def test_every_kernel_compiles_to_ptx_and_cubin(records):
    errors = [r for r in records if "error" in r or not r.get("has_ptx") or not r.get("has_cubin")]
    assert not errors, "\n".join(f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']} {r['variant']}: "
                                 f"{r.get('error', 'no PTX/cubin')}" for r in errors)
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in records}
    wanted = {(k, d, a) for k, spec in _specs().items() for d in spec.get("dtypes", DTYPES) for a in ARCHS}
    assert wanted <= seen, f"not compiled: {sorted(wanted - seen)}"


#: Kernels whose inner loop is a ``tl.dot`` (the outer-product kernel has none).
DOT_KERNELS = tuple(f"{kernel}{suffix}" for kernel in ("_ghost_norm_kernel", "_instantiate_norm_kernel")
                    for suffix in ("", "[implicit]", "[implicit-3d-wide]", "[unfolded]")) + (
                        "_embedding_norm_kernel", "_ghost_norm_wide_kernel")


def test_dots_run_on_tensor_cores(records):
    """Every dot kernel issues Hopper's warpgroup MMA (``wgmma.mma_async``) on sm_90 and the warp MMA
    (``mma.sync``) on sm_80, in every dtype and layout: a config change that falls back to FMA
    loops (e.g. a warp count that is not a warpgroup multiple) would cap the ghost route far below
    the tensor-core peak it is measured against."""
    missing = []
    for r in records:
        if r["kernel"] not in DOT_KERNELS or "error" in r:
            continue
        want, other = ("wgmma", "mma_sync") if r["arch"] == 90 else ("mma_sync", "wgmma")
        if r.get(want, 0) == 0 or r.get(other, 0) != 0:
            missing.append(f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['variant']} {r['config']}: "
                           f"wgmma={r.get('wgmma')} mma.sync={r.get('mma_sync')}")
    assert not missing, "dots not on the expected tensor-core instructions:\n" + "\n".join(missing)
    assert not any(r.get("wgmma") or r.get("mma_sync") for r in records
                   if r["kernel"] not in DOT_KERNELS and not r["kernel"].startswith(SCAN_PREFIX))


#: The recurrent scans: one program per 16 samples, so their dots have M = 16, below the 64 rows of
#: a Hopper warpgroup MMA; the warp MMA (``mma.sync``) is the tensor-core path on both archs.
SCAN_PREFIX = "_recurrent_scan"


def test_scan_dots_run_on_tensor_cores(records):
    scans = [r for r in records if r["kernel"].startswith(SCAN_PREFIX) and "error" not in r]
    assert {r["kernel"] for r in scans} == {k for k in _specs() if k.startswith(SCAN_PREFIX)}
    off = [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['variant']}: mma.sync={r.get('mma_sync')}"
           for r in scans if r.get("mma_sync", 0) == 0]
    assert not off, "scan dots not on tensor cores:\n" + "\n".join(off)
    # Unit inner strides: two stages, so the step's dot loads (W_hh from L2) are cp.async-pipelined.
    plain = [f"{r['kernel']} {r['dtype']} sm_{r['arch']}" for r in scans
             if r["variant"] == "contig" and r.get("cp_async", 0) == 0]
    assert not plain, "contiguous scan builds without cp.async pipelining:\n" + "\n".join(plain)


def test_contiguous_loads_are_pipelined(records):
    """With unit inner strides and 16-byte alignment (what a contiguous activation gives the JIT),
    the dot kernels' loads are asynchronous copies into shared memory (``cp.async``; the USE_TMA
    configs' bulk tensor copies, and those only), i.e. the num_stages software pipeline is in
    place; strided inputs fall back to plain loads (and a USE_TMA config to the pointer loads)."""
    plain = [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']}" for r in records
             if r["kernel"] in DOT_KERNELS and r["variant"] == "contig" and "error" not in r
             and (r.get("tma", 0) == 0 if "USE_TMA=True" in r["config"] else r.get("cp_async", 0) == 0)]
    assert not plain, "contiguous inputs without asynchronous copies:\n" + "\n".join(plain)
    assert not [r for r in records if r.get("tma") and ("USE_TMA=True" not in r["config"] or r["variant"] != "contig")]


def test_channels_last_implicit_loads_are_pipelined(records):
    """The implicit convolution kernels on a channels-last input number their columns channel-fastest,
    so a chunk's rows are contiguous 16-byte runs: every 16-bit load is an asynchronous copy
    (``cp.async``) in the software pipeline, none a load into registers, with the output grad
    channels-last or NCHW with positions in multiples of 16 (the layouts ``layers.conv.vector_layouts``
    hands them; an NCHW output grad of other sizes loaded element by element, hence its copy there).
    In the weight's column order (any other layout) they are gathered one element at a time and not
    pipelined (the strided builds)."""
    implicit = [r for r in records if "[implicit" in r["kernel"] and "error" not in r]
    assert {r["variant"] for r in implicit} == {"strided", *LAYOUTS}
    plain = [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']} {r['variant']}" for r in implicit
             if r["variant"] in LAYOUTS and (r.get("cp_async", 0) == 0 or r["dtype"] != "fp32" and r["ld_global"])]
    assert not plain, "channels-last implicit builds with loads outside the pipeline:\n" + "\n".join(plain)
    assert all(r.get("cp_async", 0) == 0 for r in implicit if r["variant"] == "strided" and r["dtype"] != "fp32")


def test_positions_last_views_load_as_vectors_only_at_positions_in_multiples_of_16(records):
    """The plain dot kernels on positions-last views (how a convolution's patches and output grad
    are unfolded) load them as asynchronous vector copies where the compiler knows ``T`` divisible by
    16, and element by element, none pipelined, where it does not: so the CUDA routes unfold 14 x 14
    and 7 x 7 maps into contiguous rows instead (``layers.conv.rows_layout``; rows are the
    ``contig`` builds, pipelined at any ``T``). Should a Triton release vectorise the second case,
    this fails and ``rows_layout`` can go."""
    unfolded = [r for r in records if r["kernel"].endswith("[unfolded]") and "error" not in r]
    assert {(r["kernel"], r["variant"]) for r in unfolded} == {
        (f"{kernel}[unfolded]", variant) for kernel in ("_ghost_norm_kernel", "_instantiate_norm_kernel")
        for variant in UNFOLDED_LAYOUTS}
    for r in unfolded:
        label = f"{r['kernel']} sm_{r['arch']} {r['variant']}: {r.get('cp_async')} cp.async, {r['ld_global']} ld.global"
        if r["variant"] == "positions-last":
            assert r["cp_async"] > 0, label
        else:
            assert r["cp_async"] == 0 and r["ld_global"] >= 16, label


def test_async_mma_operands_have_a_slot_per_stage(records):
    """No shared-memory buffer read by an asynchronous warpgroup MMA can be refilled while that MMA
    is in flight (``async_mma_buffer_hazards``): the race gave the ghost kernel its large-T
    deviations on the H200 and the fused kernel its weight-gradient ones."""
    bad = [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['variant']} {r['config']}: {hazard}"
           for r in records if "error" not in r for hazard in r.get("mma_buffer_hazards", ())]
    assert not bad, "async MMA operands overwritten in flight:\n" + "\n".join(bad)


def test_sm90_dot_loops_keep_their_tiles_out_of_registers(records):
    """On sm_90 a 16-bit dot kernel's loop feeds the warpgroup MMA straight from shared memory; an
    MMA tile also read into registers (``ttg.local_load``) costs shared-memory bandwidth in every
    program and chunk, and was the trigger of the race above: the bias column sums of ghost and
    instantiate loaded theirs in every program before the branch that used it. (A loop of loads
    of its own may read its own buffers into registers: no MMA reads them.)"""
    loaded = [f"{r['kernel']} {r['dtype']} {r['variant']} {r['config']}: {r['mma_tiles_in_registers']}"
              for r in records if r["kernel"] in DOT_KERNELS and r["arch"] == 90 and r["dtype"] != "fp32"
              and r["variant"] == "contig" and "error" not in r and r.get("mma_tiles_in_registers")]
    assert not loaded, "sm_90 dot kernels reading shared-memory tiles into registers:\n" + "\n".join(loaded)


def test_async_mma_buffer_hazards_reads_the_pipeline():
    """The TTGIR reading behind the test above, on the shape of the ghost kernel's loop before its
    fix: the g tile summed into registers and fed to the MMA had 2 slots at num_stages = 3."""
    def ttgir(g_slots: int, register_read: bool) -> str:
        lines = [
            f"%y_i = ttg.local_alloc : () -> !ttg.memdesc<{g_slots}x64x64xbf16, #shared, #smem, mutable>",
            "%y_jt = ttg.local_alloc : () -> !ttg.memdesc<3x64x64xbf16, #shared1, #smem, mutable>",
            "%acc:9 = scf.for %k = %c0 to %p step %c64 iter_args(%arg14 = %cst) -> (tensor<64x64xf32, #mma>) {",
            "  %y_i_187 = ttg.memdesc_index %y_i[%i] : !ttg.memdesc<2x64x64xbf16> -> !ttg.memdesc<64x64xbf16>",
            "  %y_jt_189 = ttg.memdesc_index %y_jt[%j] : !ttg.memdesc<3x64x64xbf16> -> !ttg.memdesc<64x64xbf16>",
            "  %t = ttg.memdesc_trans %y_jt_189 {order = array<i32: 1, 0>} : !ttg.memdesc<64x64xbf16>",
            "  %g = ttng.warp_group_dot %y_i_187, %t, %arg14 {inputPrecision = 0 : i32, isAsync = true} : x",
        ]
        if register_read:
            lines.append("  %y_i_188 = ttg.local_load %y_i_187 token %tok : !ttg.memdesc<64x64xbf16> -> tensor")
        return "\n".join(lines)

    assert async_mma_buffer_hazards(ttgir(2, True), 3) == ["%y_i: 2 slot(s) for num_stages=3, also read into registers"]
    assert async_mma_buffer_hazards(ttgir(2, False), 3) == ["%y_i: 2 slot(s) for num_stages=3"]
    assert async_mma_buffer_hazards(ttgir(3, True), 3) == []
    assert async_mma_buffer_hazards(ttgir(3, True), 4) == ["%y_i: 3 slot(s) for num_stages=4, also read into registers",
                                                           "%y_jt: 3 slot(s) for num_stages=4"]
    # A synchronous MMA (sm_80's path) reads its operands before the loop moves on.
    assert async_mma_buffer_hazards(ttgir(2, True).replace("isAsync = true", "isAsync = false"), 3) == []
    assert mma_tiles_read_into_registers(ttgir(3, True)) == ["%y_i"]
    assert mma_tiles_read_into_registers(ttgir(3, False)) == []
    # A buffer of its own, read into registers and by no MMA (the bias loops' pipelined loads).
    own = "\n%bias = ttg.local_alloc : () -> !ttg.memdesc<2x64x64xbf16, #shared2, #smem, mutable>" \
          "\n%b_1 = ttg.memdesc_index %bias[%k] : !ttg.memdesc<2x64x64xbf16> -> !ttg.memdesc<64x64xbf16>" \
          "\n%b_2 = ttg.local_load %b_1 token %t : !ttg.memdesc<64x64xbf16> -> tensor<64x64xbf16>"
    assert mma_tiles_read_into_registers(ttgir(3, False) + own) == []
    assert async_mma_buffer_hazards(ttgir(3, False) + own, 3) == []


def test_atomics_are_relaxed(records):
    """Every kernel's atomics only accumulate sums read after the kernel has finished (the launch
    boundary orders them), so they are relaxed: the default acq_rel put a MEMBAR.ALL.GPU and a
    CCTL.IVALL around each, in the instantiate kernel's loop over samples (once a sample) and in the
    ghost kernel's bias loop (once a chunk of p). Seen failing with one call left at the default."""
    built = [r for r in records if "error" not in r]
    assert sum(r["atomics"] for r in built) > 0  # (the parser finds them)
    ordered = sorted({(r["kernel"], r["config"]) for r in built if r["ordered_atomics"]})
    assert not ordered, ordered


def test_register_use_is_read(records):
    for r in records:
        assert 0 < r["regs"] <= 255, f"no register count parsed for {r}: {r.get('usage_line')!r}"


def _scan_spill_accepted(r: dict) -> bool:
    return (r["kernel"].startswith(SCAN_PREFIX) and r.get("stack", 0) <= SCAN_SPILL_BYTES
            and r.get("spill_depth", 99) <= 1)


def test_no_unaccepted_spills(records):
    bad = [r for r in records if _spill(r) and not _scan_spill_accepted(r)
           and (r["kernel"], r["dtype"], r["arch"], r["config"], r["variant"]) not in ACCEPTED_SPILLS]
    assert not bad, "register spills (fix the config or add to ACCEPTED_SPILLS with a reason):\n" + _table(bad)


def test_spill_loop_depth_reads_nested_loops():
    """The SASS reading behind the scans' spill rule: a spill in straight-line code is depth 0, in the
    step loop 1, in a tile loop nested in it 2 (back-edges, predicated or not, close loops)."""
    def sass(*lines):
        return "\n".join(f"        /*{a:04x}*/   {text} ;" for a, text in lines)

    body = [(0x10, "STL.64 [R1], R4"), (0x20, "IMAD R2, R3, R4, RZ"), (0x30, "LDL.64 R14, [R1]"),
            (0x40, "BAR.SYNC.DEFER_BLOCKING 0x0"), (0x50, "LDL R7, [R1+0x8]"), (0x60, "@P0 BRA 0x40"),
            (0x70, "BRA 0x20"), (0x80, "EXIT")]
    assert _spill_loop_depth(sass(*body)) == 2
    assert _spill_loop_depth(sass(*body[:4], *body[5:])) == 1
    assert _spill_loop_depth(sass(body[0], *body[6:])) == 0
    assert _spill_loop_depth(sass(*body[1:2], *body[3:4], *body[5:])) == 0  # no spill at all


def test_accepted_spills_are_still_real(records):
    by_key = {(r["kernel"], r["dtype"], r["arch"], r["config"], r["variant"]): r for r in records}
    # (the quick sweep compiles the first config of each list only: an entry for a later one is not met)
    stale = [k for k in ACCEPTED_SPILLS
             if (k in by_key and not _spill(by_key[k])) or (k not in by_key and _sweep() != "quick")]
    assert not stale, f"ACCEPTED_SPILLS entries that no longer spill or no longer exist: {stale}"


def test_some_config_fits_shared_memory(records):
    groups: dict[tuple, list[int]] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["dtype"], r["arch"]), []).append(r["shared"])
    none_fit = {k: v for k, v in groups.items() if min(v) > SHARED_LIMIT[k[2]]}
    assert not none_fit, f"no config fits shared memory: {none_fit}"


def test_hopper_configs_are_compiled_for_sm90_only(records):
    """``sm90_table`` configs (tiles that spill on sm_80, and the TMA loads sm_80 lacks) join the
    16-bit contiguous list on sm_90 only."""
    if _sweep() == "quick":
        pytest.skip("the quick sweep compiles the first config of each list, never an sm_90-only one")

    def labels(arch, variant):
        return {r["config"] for r in records if r["kernel"] == "_instantiate_norm_kernel" and r["dtype"] == "bf16"
                and r["arch"] == arch and r["variant"] == variant}

    extra = labels(90, "contig") - labels(80, "contig")
    assert extra and labels(80, "contig") < labels(90, "contig")
    assert all("BLOCK_D=256" in label or "BLOCK_P=256" in label or "USE_TMA=True" in label for label in extra)
    assert not extra & labels(90, "strided")

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-s", *sys.argv[1:]]))

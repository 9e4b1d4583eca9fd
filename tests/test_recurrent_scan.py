"""``divebatch::recurrent_scan`` / ``recurrent_scan_backward``: one direction of one recurrent layer.

The reference (``divebatch.reference``) is checked against the definition: ``nn.LSTM``/``nn.GRU``/
``nn.RNN``'s own forward for the outputs, and autograd through that forward (float64) for the
weights' and initial states' gradients formed from the scans' pre-activation gradients. The C++
CPU kernel is checked against the reference on odd shapes, strided inputs, both directions and
dtypes; plus ``torch.library.opcheck`` and the input validation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from divebatch import ops, reference

from .test_ops import requires_cpp

D = torch.ops.divebatch
#: mode -> (module class, its kwargs, gates per hidden unit)
MODES = {
    "LSTM": (nn.LSTM, {}, 4),
    "GRU": (nn.GRU, {}, 3),
    "RNN_TANH": (nn.RNN, {"nonlinearity": "tanh"}, 1),
    "RNN_RELU": (nn.RNN, {"nonlinearity": "relu"}, 1),
}


def scan_inputs(mode, B, T, H, dtype=torch.float32, bias=True, seed=0, proj=0):
    """``(gi, w_hh, b_hh, h0, c0)``, and with ``proj`` (an LSTM's P) also ``w_hr``."""
    gen = torch.Generator().manual_seed(seed)
    G, P = MODES[mode][2] * H, proj or H

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    gi, w = randn(B, T, G), randn(G, P) * 0.5
    b = randn(G) if bias else None
    h0 = randn(B, P)
    c0 = randn(B, H) if mode == "LSTM" else None
    return (gi, w, b, h0, c0) + ((randn(P, H) * 0.5,) if proj else ())


def output_grads(mode, B, T, H, dtype, seed=1, proj=0):
    gen = torch.Generator().manual_seed(seed)
    P = proj or H
    g_out, g_h = torch.randn(B, T, P, generator=gen, dtype=dtype), torch.randn(B, P, generator=gen, dtype=dtype)
    g_c = torch.randn(B, H, generator=gen, dtype=dtype) if mode == "LSTM" else None
    return g_out, g_h, g_c


# ---------------------------------------------------------------- the reference against the definition
CASES = [(mode, 0) for mode in MODES] + [("LSTM", 3)]  # (mode, an LSTM's proj_size)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode,proj", CASES, ids=lambda c: c if isinstance(c, str) else f"proj{c}")
def test_reference_matches_the_module_and_autograd(mode, proj, reverse):
    """Outputs equal the module's; the weights' gradients formed from grad_gi / grad_gh (G^T A
    summed over steps and samples; W_hr's from grad_projected and o tanh c) and the initial
    states' equal autograd's through the module."""
    torch.manual_seed(0)
    cls, kwargs, _ = MODES[mode]
    B, T, I, H = 3, 6, 4, 5
    P = proj or H
    module = cls(I, H, batch_first=True, **kwargs, **({"proj_size": proj} if proj else {})).double()
    x = torch.randn(B, T, I, dtype=torch.float64)
    h0 = torch.randn(B, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True) if mode == "LSTM" else None
    # The module runs forward in time: a reversed direction is the module on the flipped sequence.
    seq = x.flip(1) if reverse else x
    out_ref, hidden = module(seq, (h0[None], c0[None]) if mode == "LSTM" else h0[None])
    out_ref = out_ref.flip(1) if reverse else out_ref
    g_out, g_h, g_c = output_grads(mode, B, T, H, torch.float64, proj=proj)
    finals = [(hidden[0] if mode == "LSTM" else hidden)[0]] + ([hidden[1][0]] if mode == "LSTM" else [])
    loss = (out_ref * g_out).sum() + sum((f * g).sum() for f, g in zip(finals, [g_h, g_c]))
    wanted = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0, h0]
    wanted += ([c0] if c0 is not None else []) + ([module.weight_hr_l0] if proj else [])
    expected = torch.autograd.grad(loss, wanted)
    w_hr = module.weight_hr_l0 if proj else None

    with torch.no_grad():
        gi = x @ module.weight_ih_l0.t() + module.bias_ih_l0
        out, cells, saved, h_n, c_n = reference.recurrent_scan(gi, module.weight_hh_l0, module.bias_hh_l0, h0,
                                                               c0, w_hr, None, mode, reverse)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(h_n, finals[0])
        if mode == "LSTM":
            torch.testing.assert_close(cells[:, 0 if reverse else -1], hidden[1][0])
            torch.testing.assert_close(c_n, hidden[1][0])
        grad_gi, grad_gh, grad_h0, grad_c0, grad_projected = reference.recurrent_scan_backward(
            g_out, g_h, g_c, module.weight_hh_l0, h0, c0, w_hr, out, cells, saved, None, mode, reverse)
        assert (grad_gh.numel() > 0) == (mode == "GRU") and (grad_projected.numel() > 0) == bool(proj)
        grad_gh = grad_gh if mode == "GRU" else grad_gi
        h_prev = torch.cat([out[:, 1:], h0[:, None]], 1) if reverse else torch.cat([h0[:, None], out[:, :-1]], 1)
        got = [torch.einsum("btg,bti->gi", grad_gi, x), torch.einsum("btg,bth->gh", grad_gh, h_prev),
               grad_gi.sum((0, 1)), grad_gh.sum((0, 1)), grad_h0] + ([grad_c0] if mode == "LSTM" else [])
        if proj:  # W_hr's input: o * tanh(c), from what the scan kept
            got.append(torch.einsum("btp,bth->ph", grad_projected, saved[..., 3 * H:4 * H] * saved[..., 4 * H:]))
    for name, g, e in zip(["W_ih", "W_hh", "b_ih", "b_hh", "h0", "c0", "W_hr"], got, expected):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- C++ against the reference
def compare_cpp_to_reference(mode, gi, w, b, h0, c0, reverse, grads, lengths=None, w_hr=None):
    got = D.recurrent_scan(gi, w, b, h0, c0, w_hr, lengths, mode, reverse)
    want = reference.recurrent_scan(gi, w, b, h0, c0, w_hr, lengths, mode, reverse)
    for name, x, y in zip(("out", "cells", "saved", "h_n", "c_n"), got, want):
        torch.testing.assert_close(x, y, msg=lambda m, name=name: f"{name}: {m}")
    g_out, g_h, g_c = grads
    got_b = D.recurrent_scan_backward(g_out, g_h, g_c, w, h0, c0, w_hr, *want[:3], lengths, mode, reverse)
    want_b = reference.recurrent_scan_backward(g_out, g_h, g_c, w, h0, c0, w_hr, *want[:3], lengths, mode, reverse)
    for name, x, y in zip(("grad_gi", "grad_gh", "grad_h0", "grad_c0", "grad_projected"), got_b, want_b):
        torch.testing.assert_close(x, y, msg=lambda m, name=name: f"{name}: {m}")


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("final_grads", [True, False], ids=["final-grads", "no-final-grads"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_matches_reference(mode, reverse, bias, final_grads, dtype):
    B, T, H = 3, 7, 5
    gi, w, b, h0, c0 = scan_inputs(mode, B, T, H, dtype, bias)
    g_out, g_h, g_c = output_grads(mode, B, T, H, dtype)
    grads = (g_out, g_h, g_c) if final_grads else (g_out, None, None)
    compare_cpp_to_reference(mode, gi, w, b, h0, c0, reverse, grads)


@requires_cpp
@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_strided_inputs(mode):
    """gi as a time-major buffer's view, h0/c0 as rows of a [layers, B, H] state, w_hh a slice,
    grad_out a slice of a wider (bidirectional) output's gradient."""
    B, T, H = 4, 5, 6
    gi, w, b, h0, c0 = scan_inputs(mode, B, T, H)
    gi_strided = gi.transpose(0, 1).contiguous().transpose(0, 1)
    w_strided = torch.cat([w, torch.zeros_like(w)], 1)[:, :H]  # (row stride 2H)
    states = torch.stack([h0, h0 * 2])
    c_states = torch.stack([c0 * 2, c0]) if c0 is not None else None
    g_out, g_h, g_c = output_grads(mode, B, T, H, torch.float32)
    wide = torch.cat([g_out, g_out * 3], -1)[..., H:]
    assert not gi_strided.is_contiguous() and not w_strided.is_contiguous() and not wide.is_contiguous()
    compare_cpp_to_reference(mode, gi_strided, w_strided, b, states[1], None if c0 is None else c_states[1],
                             True, (wide, g_h, g_c))


@requires_cpp
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_padded_steps_match_reference(mode, reverse):
    B, T, H = 5, 6, 4
    gi, w, b, h0, c0 = scan_inputs(mode, B, T, H)
    lengths = torch.tensor([6, 1, 3, 0, 5])
    compare_cpp_to_reference(mode, gi, w, b, h0, c0, reverse, output_grads(mode, B, T, H, torch.float32), lengths)


@requires_cpp
@pytest.mark.parametrize("padded", [False, True], ids=["whole", "padded"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_cpp_projected_lstm_matches_reference(reverse, padded):
    B, T, H, P = 5, 6, 7, 3
    gi, w, b, h0, c0, w_hr = scan_inputs("LSTM", B, T, H, proj=P)
    lengths = torch.tensor([6, 1, 3, 0, 5]) if padded else None
    compare_cpp_to_reference("LSTM", gi, w, b, h0, c0, reverse, output_grads("LSTM", B, T, H, torch.float32, proj=P),
                             lengths, w_hr)


@requires_cpp
@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(list(MODES)), B=st.integers(1, 5), T=st.integers(1, 9), H=st.integers(1, 7),
       reverse=st.booleans(), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_cpp_random_shapes(mode, B, T, H, reverse, padded, seed):
    gi, w, b, h0, c0 = scan_inputs(mode, B, T, H, torch.float64, seed=seed)
    lengths = torch.randint(0, T + 1, (B,), generator=torch.Generator().manual_seed(seed)) if padded else None
    compare_cpp_to_reference(mode, gi, w, b, h0, c0, reverse, output_grads(mode, B, T, H, torch.float64, seed + 1),
                             lengths)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", list(MODES))
def test_padded_steps_are_the_sequence_cut_at_its_length(mode, reverse):
    """With ``lengths``, each sample's results are those of its own sequence cut at its length (the
    reference without lengths, one sample at a time): 0 output and gradients on padded steps, h_n
    the state after its last step, a reversed direction starting from that step; a sample without
    steps keeps its initial state."""
    B, T, H = 4, 6, 5
    gi, w, b, h0, c0 = scan_inputs(mode, B, T, H, torch.float64)
    lengths = torch.tensor([6, 1, 3, 0])
    g_out, g_h, g_c = output_grads(mode, B, T, H, torch.float64)
    out, cells, saved, h_n, c_n = reference.recurrent_scan(gi, w, b, h0, c0, None, lengths, mode, reverse)
    grad_gi, grad_gh, grad_h0, grad_c0, _ = reference.recurrent_scan_backward(g_out, g_h, g_c, w, h0, c0, None, out,
                                                                              cells, saved, lengths, mode, reverse)
    lstm, gru = mode == "LSTM", mode == "GRU"
    for s, L in enumerate(lengths.tolist()):
        row = slice(s, s + 1)
        assert (out[s, L:] == 0).all() and (grad_gi[s, L:] == 0).all()
        if L == 0:
            torch.testing.assert_close(h_n[s], h0[s])
            torch.testing.assert_close(grad_h0[s], g_h[s])
            continue
        c0_s, g_c_s = (c0[row], g_c[row]) if lstm else (None, None)
        o, c, sv, hn, cn = reference.recurrent_scan(gi[row, :L], w, b, h0[row], c0_s, None, None, mode, reverse)
        want = reference.recurrent_scan_backward(g_out[row, :L], g_h[row], g_c_s, w, h0[row], c0_s, None, o, c, sv,
                                                 None,
                                                 mode, reverse)
        torch.testing.assert_close(out[s, :L], o[0])
        torch.testing.assert_close(h_n[s], hn[0])
        torch.testing.assert_close(grad_gi[s, :L], want[0][0])
        torch.testing.assert_close(grad_h0[s], want[2][0])
        if lstm:
            torch.testing.assert_close(c_n[s], cn[0])
            torch.testing.assert_close(grad_c0[s], want[3][0])
        if gru:
            torch.testing.assert_close(grad_gh[s, :L], want[1][0])


@requires_cpp
@pytest.mark.parametrize("scale", [1e-4, 1.0, 40.0], ids=["tiny", "unit", "saturating"])
@pytest.mark.parametrize("mode", list(MODES))
def test_cpp_float32_cell_math_against_float64(mode, scale):
    """The float32 kernel's own exp/tanh (vectorised; within ~1 ulp) against the float64 reference
    on the same inputs: relative accuracy at tiny pre-activations (tanh x ~ x), saturation at large.
    One step from h0 = 0 without bias, so that the gates are the activations of gi alone: no GEMM
    rounding and no cancellation (the LSTM's f c0 + i g) in what is compared."""
    gi, w, _, h0, c0 = scan_inputs(mode, 64, 1, 33, bias=False)
    gi, h0 = gi * scale, torch.zeros_like(h0)
    got = D.recurrent_scan(gi, w, None, h0, c0, None, None, mode, False)
    want = reference.recurrent_scan(*(None if t is None else t.double() for t in (gi, w, None, h0, c0)), None, None,
                                    mode, False)
    gates = MODES[mode][2] * 33  # LSTM: i, f, g, o; GRU: r, z, n (its W_hn h is 0 here)
    pairs = [(got[0], want[0])] if mode.startswith("RNN") else [(got[2][..., :gates], want[2][..., :gates])]
    for x, y in pairs:
        torch.testing.assert_close(x.double(), y, rtol=4 * 2**-24, atol=1e-30)


def test_results_are_time_major_views():
    """Each step's slice is contiguous (what the per-step kernels and the weights' GEMMs read), on
    every implementation and in the fake kernel's declaration alike."""
    gi, w, b, h0, c0 = scan_inputs("LSTM", 3, 4, 5)
    impls = [reference.recurrent_scan] + ([D.recurrent_scan] if ops.CPP_AVAILABLE else [])
    for impl in impls:
        for result in impl(gi, w, b, h0, c0, None, None, "LSTM", False)[:3]:
            assert result.transpose(0, 1).is_contiguous(), impl


@requires_cpp
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_opcheck(mode):
    gi, w, b, h0, c0 = scan_inputs(mode, 2, 3, 4)
    lengths = torch.tensor([3, 1])
    torch.library.opcheck(D.recurrent_scan.default, (gi, w, b, h0, c0, None, lengths, mode, True))
    out, cells, saved, _, _ = reference.recurrent_scan(gi, w, b, h0, c0, None, lengths, mode, True)
    g_out, g_h, g_c = output_grads(mode, 2, 3, 4, torch.float32)
    torch.library.opcheck(D.recurrent_scan_backward.default, (g_out, g_h, g_c, w, h0, c0, None, out, cells, saved,
                                                              lengths, mode, True))


# ---------------------------------------------------------------- input validation
def _bad(cell="LSTM", **changes):
    gi, w, b, h0, c0 = scan_inputs(cell, 2, 3, 4)
    args = {"gi": gi, "w_hh": w, "b_hh": b, "h0": h0, "c0": c0, "w_hr": None, "lengths": None, "mode": cell,
            "reverse": False}
    args.update(changes)
    return tuple(args.values())


BAD_SCANS = [
    (_bad(mode="lstm"), r'mode must be one of "LSTM", "GRU", "RNN_TANH", "RNN_RELU"'),
    (_bad(gi=torch.randn(2, 3, 12)), r"w_hh must have shape \[G, H\] = \[12, 3\]"),
    (_bad(gi=torch.randn(2, 3, 10)), r"gi's last dim must be 4 x the hidden size"),
    (_bad("GRU", w_hr=torch.randn(2, 4)), r"w_hr \(a projection\) is for an LSTM only"),
    (_bad(w_hr=torch.randn(2, 4)), r"w_hh must have shape \[G, P\] = \[16, 2\]"),
    (_bad(c0=None), r"c0 is required for an LSTM"),
    (_bad("GRU", c0=torch.randn(2, 4)), r"c0 is for an LSTM only"),
    (_bad(h0=torch.randn(3, 4)), r"h0 must have shape \[B, H\] = \[2, 4\]"),
    (_bad(b_hh=torch.randn(16, dtype=torch.float64)), r"b_hh must have the dtype of gi"),
    (_bad(gi=torch.randn(2, 3, 16).half()), r"gi must be float32 or float64"),
    (_bad(gi=torch.randn(6, 16)), r"gi must be 3-D \[B, T, G\]"),
    (_bad(lengths=torch.tensor([3, 1], dtype=torch.int32)), r"lengths must be an int64 CPU tensor of shape \[B\]"),
    (_bad(lengths=torch.tensor([3, 4])), r"lengths\[1\] = 4 is outside \[0, T\] = \[0, 3\]"),
]


@requires_cpp
@pytest.mark.parametrize("args,message", BAD_SCANS, ids=range(len(BAD_SCANS)))
def test_bad_inputs_name_the_argument(args, message):
    with pytest.raises(RuntimeError, match=message):
        D.recurrent_scan(*args)


@requires_cpp
def test_backward_bad_inputs_name_the_argument():
    gi, w, b, h0, c0 = scan_inputs("GRU", 2, 3, 4)
    out, cells, saved, _, _ = D.recurrent_scan(gi, w, b, h0, c0, None, None, "GRU", False)
    with pytest.raises(RuntimeError, match=r"saved must have shape \[B, T, k H\] = \[2, 3, 16\]"):
        D.recurrent_scan_backward(out, None, None, w, h0, None, None, out, cells, saved[..., :-1], None, "GRU", False)
    with pytest.raises(RuntimeError, match=r"grad_c_n is for an LSTM only"):
        D.recurrent_scan_backward(out, None, h0, w, h0, None, None, out, cells, saved, None, "GRU", False)

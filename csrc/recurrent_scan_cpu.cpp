// CPU kernels of divebatch::recurrent_scan and divebatch::recurrent_scan_backward: one direction
// of one nn.RNN / nn.LSTM / nn.GRU layer, stepped in C++ (formulas in divebatch/reference.py).
//
// Why: the tracker needs the gradients of every step's pre-activations (the per-sample norms of
// W_ih and W_hh are read from them), which the native fused kernels never expose. Unrolled in
// Python, each step costs a dozen Python calls and autograd nodes; here a step is one GEMM
// (h_{t-1} W_hh^T, the only sequential matrix work) plus ATen's vectorised elementwise kernels,
// called without autograd, writing straight into the [B, T, *] results. The input projection
// x W_ih^T + b_ih of all steps is one GEMM made by the caller (gi), and so are the weights'
// gradients from grad_gi / grad_gh afterwards.
#include "divebatch_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace divebatch {
namespace {

enum class Cell { kLSTM, kGRU, kTanh, kReLU };

struct CellInfo {
  Cell cell;
  int64_t gates;  // G / H
  int64_t saved;  // columns of `saved` per step, in multiples of H (divebatch.reference.SCAN_SAVED)
};

CellInfo cell_info(const std::string& mode, const char* op) {
  if (mode == "LSTM") return {Cell::kLSTM, 4, 5};
  if (mode == "GRU") return {Cell::kGRU, 3, 4};
  if (mode == "RNN_TANH") return {Cell::kTanh, 1, 0};
  if (mode == "RNN_RELU") return {Cell::kReLU, 1, 0};
  TORCH_CHECK(false, "divebatch::", op, ": mode must be one of \"LSTM\", \"GRU\", \"RNN_TANH\", \"RNN_RELU\" "
              "(the module's .mode), got \"", mode, "\"");
}

void check_tensor(const at::Tensor& t, const at::Tensor& ref, std::initializer_list<int64_t> shape, const char* op,
                  const char* name, const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), "divebatch::", op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "divebatch::", op, ": ", name, " must have the dtype of gi (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "divebatch::", op, ": ", name, " must have shape ", layout, " = ",
              at::IntArrayRef(shape), ", got ", t.sizes());
}

void check_optional(const std::optional<at::Tensor>& t, bool wanted, const at::Tensor& ref,
                    std::initializer_list<int64_t> shape, const char* op, const char* name, const char* layout,
                    const std::string& mode) {
  if (!wanted) {
    TORCH_CHECK(!t.has_value() || !t->defined(), "divebatch::", op, ": ", name, " is for an LSTM only; pass None "
                "for mode \"", mode, "\"");
    return;
  }
  TORCH_CHECK(t.has_value() && t->defined(), "divebatch::", op, ": ", name, " is required for an LSTM");
  check_tensor(*t, ref, shape, op, name, layout);
}

// Autograd must not record the kernels' own ATen calls: they are the implementation, not the graph
// (and skipping the autograd keys keeps the per-call dispatch cost down).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent_scan_cpu(const at::Tensor& gi, const at::Tensor& w_hh,
                                                                  const std::optional<at::Tensor>& b_hh,
                                                                  const at::Tensor& h0,
                                                                  const std::optional<at::Tensor>& c0,
                                                                  c10::string_view mode_view, bool reverse) {
  constexpr const char* op = "recurrent_scan";
  const std::string mode(mode_view);
  const CellInfo info = cell_info(mode, op);
  TORCH_CHECK(gi.device().is_cpu(), "divebatch::", op, ": gi must be a CPU tensor, got device ", gi.device());
  TORCH_CHECK(gi.scalar_type() == at::kFloat || gi.scalar_type() == at::kDouble, "divebatch::", op,
              ": gi must be float32 or float64 (the recurrence is stepped in its dtype), got ", gi.scalar_type());
  TORCH_CHECK(gi.dim() == 3, "divebatch::", op, ": gi must be 3-D [B, T, G], got shape ", gi.sizes());
  TORCH_CHECK(w_hh.dim() == 2, "divebatch::", op, ": w_hh must be 2-D [G, H], got shape ", w_hh.sizes());
  const int64_t B = gi.size(0), T = gi.size(1), G = gi.size(2), H = w_hh.size(1);
  TORCH_CHECK(G == info.gates * H, "divebatch::", op, ": gi's last dim must be ", info.gates, " x H = ",
              info.gates * H, " for mode \"", mode, "\" (H = w_hh.size(1)), got ", G);
  check_tensor(w_hh, gi, {G, H}, op, "w_hh", "[G, H]");
  const bool has_bias = b_hh.has_value() && b_hh->defined();
  if (has_bias) check_tensor(*b_hh, gi, {G}, op, "b_hh", "[G]");
  check_tensor(h0, gi, {B, H}, op, "h0", "[B, H]");
  check_optional(c0, info.cell == Cell::kLSTM, gi, {B, H}, op, "c0", "[B, H]", mode);

  BelowAutograd guard;
  const auto opts = gi.options();
  // Every buffer is time-major ([T, B, *], returned as [B, T, *] views) so that each step's
  // slice is contiguous: the step GEMM and the elementwise kernels run fastest on those.
  at::Tensor out = at::empty({T, B, H}, opts);
  at::Tensor cells = at::empty(info.cell == Cell::kLSTM ? at::IntArrayRef{T, B, H} : at::IntArrayRef{0}, opts);
  at::Tensor saved = at::empty({T, B, info.saved * H}, opts);
  // The step GEMM reads W_hh^T row by row: one transposed copy, not a strided read every step.
  const at::Tensor wt = w_hh.t().contiguous();
  // The input pre-activations, time-major and owned: LSTM and RNN add the step GEMM into them in
  // place, with b_hh folded in once (a GRU keeps W_hh h + b_hh apart: r multiplies its n part).
  at::Tensor pre = at::empty({T, B, G}, opts);
  if (has_bias && info.cell != Cell::kGRU) {
    at::add_out(pre, gi.transpose(0, 1), *b_hh);
  } else {
    pre.copy_(gi.transpose(0, 1));
  }
  at::Tensor gh = info.cell == Cell::kGRU ? at::empty({B, G}, opts) : at::Tensor();
  at::Tensor h = h0.contiguous(), c = info.cell == Cell::kLSTM ? c0->contiguous() : at::Tensor();

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    at::Tensor pre_t = pre.select(0, t);
    at::Tensor h_t = out.select(0, t);
    switch (info.cell) {
      case Cell::kLSTM: {
        pre_t.addmm_(h, wt);
        const at::Tensor st = saved.select(0, t);  // [i, f, g, o, tanh(c)]
        at::Tensor gates = st.narrow(1, 0, G), g = st.narrow(1, 2 * H, H);
        at::sigmoid_out(gates, pre_t);  // (g is overwritten by its tanh next)
        at::tanh_out(g, pre_t.narrow(1, 2 * H, H));
        at::Tensor c_t = cells.select(0, t);
        at::mul_out(c_t, st.narrow(1, H, H), c);
        c_t.addcmul_(st.narrow(1, 0, H), g);
        at::Tensor tanh_c = st.narrow(1, 4 * H, H);
        at::tanh_out(tanh_c, c_t);
        at::mul_out(h_t, st.narrow(1, 3 * H, H), tanh_c);
        c = c_t;
        break;
      }
      case Cell::kGRU: {
        if (has_bias) {
          at::addmm_out(gh, *b_hh, h, wt);
        } else {
          at::mm_out(gh, h, wt);
        }
        const at::Tensor st = saved.select(0, t);  // [r, z, n, W_hn h + b_hn]
        at::Tensor rz = st.narrow(1, 0, 2 * H);
        at::add_out(rz, pre_t.narrow(1, 0, 2 * H), gh.narrow(1, 0, 2 * H));
        rz.sigmoid_();
        at::Tensor hn = st.narrow(1, 3 * H, H);
        hn.copy_(gh.narrow(1, 2 * H, H));
        at::Tensor n = st.narrow(1, 2 * H, H);
        at::mul_out(n, st.narrow(1, 0, H), hn);
        n.add_(pre_t.narrow(1, 2 * H, H));
        n.tanh_();
        at::sub_out(h_t, h, n);  // h_t = n + z (h - n) = (1 - z) n + z h
        h_t.mul_(st.narrow(1, H, H));
        h_t.add_(n);
        break;
      }
      case Cell::kTanh:
        pre_t.addmm_(h, wt);
        at::tanh_out(h_t, pre_t);
        break;
      case Cell::kReLU:
        pre_t.addmm_(h, wt);
        at::clamp_min_out(h_t, pre_t, 0);
        break;
    }
    h = h_t;
  }
  return {out.transpose(0, 1), info.cell == Cell::kLSTM ? cells.transpose(0, 1) : cells, saved.transpose(0, 1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_scan_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h_n, const std::optional<at::Tensor>& grad_c_n,
    const at::Tensor& w_hh, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& out,
    const at::Tensor& cells, const at::Tensor& saved, c10::string_view mode_view, bool reverse) {
  constexpr const char* op = "recurrent_scan_backward";
  const std::string mode(mode_view);
  const CellInfo info = cell_info(mode, op);
  TORCH_CHECK(out.device().is_cpu(), "divebatch::", op, ": out must be a CPU tensor, got device ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, "divebatch::", op,
              ": out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 3, "divebatch::", op, ": out must be 3-D [B, T, H], got shape ", out.sizes());
  const int64_t B = out.size(0), T = out.size(1), H = out.size(2), G = info.gates * H;
  check_tensor(grad_out, out, {B, T, H}, op, "grad_out", "[B, T, H]");
  if (grad_h_n.has_value() && grad_h_n->defined()) check_tensor(*grad_h_n, out, {B, H}, op, "grad_h_n", "[B, H]");
  if (info.cell == Cell::kLSTM) {
    if (grad_c_n.has_value() && grad_c_n->defined()) {
      check_tensor(*grad_c_n, out, {B, H}, op, "grad_c_n", "[B, H]");
    }
  } else {
    check_optional(grad_c_n, false, out, {B, H}, op, "grad_c_n", "[B, H]", mode);
  }
  check_tensor(w_hh, out, {G, H}, op, "w_hh", "[G, H]");
  check_tensor(h0, out, {B, H}, op, "h0", "[B, H]");
  check_optional(c0, info.cell == Cell::kLSTM, out, {B, H}, op, "c0", "[B, H]", mode);
  if (info.cell == Cell::kLSTM) {
    check_tensor(cells, out, {B, T, H}, op, "cells", "[B, T, H]");
  }
  check_tensor(saved, out, {B, T, info.saved * H}, op, "saved", "[B, T, k H]");

  BelowAutograd guard;
  const auto opts = out.options();
  // Time-major, as in the forward: every step's slice of the results is contiguous (and so are
  // the forward's, when they come from recurrent_scan_cpu).
  const at::Tensor out_tb = out.transpose(0, 1), saved_tb = saved.transpose(0, 1);
  const at::Tensor cells_tb = info.cell == Cell::kLSTM ? cells.transpose(0, 1) : cells;
  const at::Tensor grad_out_tb = grad_out.transpose(0, 1);
  at::Tensor grad_gi = at::empty({T, B, G}, opts);
  at::Tensor grad_gh = at::empty(info.cell == Cell::kGRU ? at::IntArrayRef{T, B, G} : at::IntArrayRef{0}, opts);
  at::Tensor dh = grad_h_n.has_value() && grad_h_n->defined() ? grad_h_n->clone(at::MemoryFormat::Contiguous)
                                                              : at::zeros({B, H}, opts);
  at::Tensor dc;
  if (info.cell == Cell::kLSTM) {
    dc = grad_c_n.has_value() && grad_c_n->defined() ? grad_c_n->clone(at::MemoryFormat::Contiguous)
                                                     : at::zeros({B, H}, opts);
  }
  at::Tensor tmp = at::empty({B, H}, opts);

  // The steps in the opposite order of the forward; `prev` is the step before t in the forward.
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? s : T - 1 - s;
    const int64_t prev = reverse ? t + 1 : t - 1;
    const bool first = prev < 0 || prev >= T;
    dh.add_(grad_out_tb.select(0, t));
    at::Tensor dg = grad_gi.select(0, t);
    switch (info.cell) {
      case Cell::kLSTM: {
        const at::Tensor st = saved_tb.select(0, t);
        const at::Tensor i = st.narrow(1, 0, H), f = st.narrow(1, H, H), g = st.narrow(1, 2 * H, H),
                         o = st.narrow(1, 3 * H, H), tanh_c = st.narrow(1, 4 * H, H);
        const at::Tensor c_prev = first ? *c0 : cells_tb.select(0, prev);
        at::Tensor d_o = dg.narrow(1, 3 * H, H);
        at::mul_out(d_o, dh, tanh_c);
        at::sigmoid_backward_out(d_o, d_o, o);
        at::mul_out(tmp, dh, o);
        at::tanh_backward_out(tmp, tmp, tanh_c);
        dc.add_(tmp);
        at::Tensor d_i = dg.narrow(1, 0, H), d_f = dg.narrow(1, H, H);
        at::mul_out(d_i, dc, g);
        at::mul_out(d_f, dc, c_prev);
        at::Tensor d_if = dg.narrow(1, 0, 2 * H);  // i and f are both sigmoids: one backward call
        at::sigmoid_backward_out(d_if, d_if, st.narrow(1, 0, 2 * H));
        at::Tensor d_g = dg.narrow(1, 2 * H, H);
        at::mul_out(d_g, dc, i);
        at::tanh_backward_out(d_g, d_g, g);
        dc.mul_(f);
        at::mm_out(dh, dg, w_hh);
        break;
      }
      case Cell::kGRU: {
        const at::Tensor st = saved_tb.select(0, t);
        const at::Tensor r = st.narrow(1, 0, H), z = st.narrow(1, H, H), n = st.narrow(1, 2 * H, H),
                         hn = st.narrow(1, 3 * H, H);
        const at::Tensor h_prev = first ? h0 : out_tb.select(0, prev);
        at::Tensor dgh = grad_gh.select(0, t);
        at::Tensor d_n = dg.narrow(1, 2 * H, H);  // dh (1 - z) tanh'(n)
        at::mul_out(d_n, dh, z);
        at::sub_out(d_n, dh, d_n);
        at::tanh_backward_out(d_n, d_n, n);
        at::Tensor d_z = dg.narrow(1, H, H);  // dh (h_prev - n) sigmoid'(z)
        at::sub_out(d_z, h_prev, n);
        d_z.mul_(dh);
        at::sigmoid_backward_out(d_z, d_z, z);
        at::Tensor d_r = dg.narrow(1, 0, H);  // d_n hn sigmoid'(r)
        at::mul_out(d_r, d_n, hn);
        at::sigmoid_backward_out(d_r, d_r, r);
        dgh.narrow(1, 0, 2 * H).copy_(dg.narrow(1, 0, 2 * H));
        at::Tensor dgh_n = dgh.narrow(1, 2 * H, H);
        at::mul_out(dgh_n, d_n, r);
        dh.mul_(z);
        dh.addmm_(dgh, w_hh);
        break;
      }
      case Cell::kTanh:
        at::tanh_backward_out(dg, dh, out_tb.select(0, t));
        at::mm_out(dh, dg, w_hh);
        break;
      case Cell::kReLU:
        at::threshold_backward_out(dg, dh, out_tb.select(0, t), 0);
        at::mm_out(dh, dg, w_hh);
        break;
    }
  }
  at::Tensor grad_c0 = info.cell == Cell::kLSTM ? dc : at::empty({0}, opts);
  return {grad_gi.transpose(0, 1), info.cell == Cell::kGRU ? grad_gh.transpose(0, 1) : grad_gh, dh, grad_c0};
}

}  // namespace divebatch

// The schemas live in divebatch/ops.py (torch.library); here only the CPU implementations.
TORCH_LIBRARY_IMPL(divebatch, CPU, m) {
  m.impl("recurrent_scan", &divebatch::recurrent_scan_cpu);
  m.impl("recurrent_scan_backward", &divebatch::recurrent_scan_backward_cpu);
}

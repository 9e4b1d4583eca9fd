// CPU kernels of divebatch::recurrent_scan and divebatch::recurrent_scan_backward: one direction
// of one nn.RNN / nn.LSTM / nn.GRU layer, stepped in C++ (formulas in divebatch/reference.py).
//
// Why: the tracker needs the gradients of every step's pre-activations (the per-sample norms of
// W_ih and W_hh are read from them), which the native fused kernels never expose. Unrolled in
// Python, each step costs a dozen Python calls and autograd nodes; here a step is one GEMM
// (h_{t-1} W_hh^T, the only sequential matrix work, through ATen) plus one pass of a vectorised
// loop over the [B, H] cell (the gates, the state update and what the backward keeps), writing
// straight into time-major results. The input projection x W_ih^T + b_ih of all steps is one GEMM
// made by the caller (gi), and so are the weights' gradients from grad_gi / grad_gh afterwards.
#include "divebatch_ops.h"
#include "multiversion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// ------------------------------------------------------------------ the cell's math
// float32: exp without a library call, so the cell loops vectorise (the C library's expf is a
// call per element: 4 ns, five times the whole vectorised cell). x = n ln2 + r with |r| <= ln2/2;
// exp(r) by Cephes' degree-6 polynomial for expf; 2^n from the exponent bits. Within 1 ulp of
// exp over the clamped range (measured against float64 every 1e-3 over [-87, 88]); the clamp
// keeps 2^n a normal float: sigmoid and tanh saturate long before it.
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 in two parts: r is exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid_of(float x) { return 1.f / (1.f + exp_f32(-x)); }
inline double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// tanh: Cephes' odd polynomial below |x| = 0.625, where 1 - 2 / (e^2|x| + 1) would lose the
// small values' relative accuracy; both are computed and one is picked (no branch in the loop).
inline float tanh_of(float x) {
  const float z = x * x;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * x + x;
  const float large = std::copysign(1.f - 2.f / (exp_f32(2.f * std::fabs(x)) + 1.f), x);
  return std::fabs(x) < 0.625f ? small : large;
}
inline double tanh_of(double x) { return std::tanh(x); }

// ------------------------------------------------------------------ one step's cell, row by row
// Buffers are contiguous [B, width] slices of the time-major results, or the [B, H] states carried
// from step to step; rows [r0, r1) of the batch. PyTorch's gate orders: LSTM i, f, g, o; GRU r, z,
// n. `lengths` (null: every step counts) marks sample b's steps t >= lengths[b] as padding, as in
// a PackedSequence: output and kept activations 0, the carried state (and, backwards, its
// gradient) passed through unchanged.

inline bool counts(const int64_t* lengths, int64_t b, int64_t t) { return lengths == nullptr || t < lengths[b]; }

// The row of the state a step started from: the previous step's result where that step counted,
// else the initial state (a reversed direction starts at each sample's own last step).
template <typename T>
inline const T* start_row(const T* previous, const T* initial, const int64_t* lengths, int64_t b, int64_t prev,
                          int64_t H) {
  return previous != nullptr && counts(lengths, b, prev) ? previous + b * H : initial + b * H;
}

template <typename T>
inline void zero_row(T* row, int64_t n) {
  std::fill(row, row + n, T(0));
}

// pre = gi + b_hh + h W_hh^T; updates h_state and c_state in place.
template <typename T>
inline __attribute__((always_inline)) void lstm_forward(const T* pre, T* saved, T* cells, T* out, T* h_state,
                                                        T* c_state, const int64_t* lengths, int64_t t, int64_t r0,
                                                        int64_t r1, int64_t H) {
  for (int64_t b = r0; b < r1; ++b) {
    const T* p = pre + b * 4 * H;
    T* s = saved + b * 5 * H;  // i, f, g, o, tanh(c)
    T* cb = cells + b * H;
    T* ob = out + b * H;
    T* hs = h_state + b * H;
    T* cs = c_state + b * H;
    if (!counts(lengths, b, t)) {
      zero_row(s, 5 * H);
      zero_row(ob, H);
      std::copy(cs, cs + H, cb);
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T i = sigmoid_of(p[j]), f = sigmoid_of(p[H + j]), g = tanh_of(p[2 * H + j]), o = sigmoid_of(p[3 * H + j]);
      const T cn = f * cs[j] + i * g;
      const T tc = tanh_of(cn);
      s[j] = i;
      s[H + j] = f;
      s[2 * H + j] = g;
      s[3 * H + j] = o;
      s[4 * H + j] = tc;
      cb[j] = cs[j] = cn;
      ob[j] = hs[j] = o * tc;
    }
  }
}

// dh (the carried gradient of h; grad_out's row is added here) and dc (carried through c) are
// [B, H]; writes the gate pre-activations' gradient dg [B, 4H] and leaves dh = 0 on counted rows
// (the caller adds dg W_hh).
template <typename T>
inline __attribute__((always_inline)) void lstm_backward(const T* grad_out, const T* saved, const T* cells_prev,
                                                         const T* c0, T* dh, T* dc, T* dg, const int64_t* lengths,
                                                         int64_t t, int64_t prev, int64_t r0, int64_t r1, int64_t H) {
  for (int64_t b = r0; b < r1; ++b) {
    T* d = dg + b * 4 * H;
    if (!counts(lengths, b, t)) {
      zero_row(d, 4 * H);
      continue;
    }
    const T* s = saved + b * 5 * H;
    const T* go = grad_out + b * H;
    const T* cp = start_row(cells_prev, c0, lengths, b, prev, H);
    T* dhb = dh + b * H;
    T* dcb = dc + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T i = s[j], f = s[H + j], g = s[2 * H + j], o = s[3 * H + j], tc = s[4 * H + j];
      const T dhv = dhb[j] + go[j];
      const T dcv = dcb[j] + dhv * o * (1 - tc * tc);
      d[j] = dcv * g * i * (1 - i);
      d[H + j] = dcv * cp[j] * f * (1 - f);
      d[2 * H + j] = dcv * i * (1 - g * g);
      d[3 * H + j] = dhv * tc * o * (1 - o);
      dcb[j] = dcv * f;
      dhb[j] = 0;
    }
  }
}

// gi: the input pre-activations [B, 3H]; gh = W_hh h + b_hh [B, 3H]; updates h_state in place.
template <typename T>
inline __attribute__((always_inline)) void gru_forward(const T* gi, const T* gh, T* saved, T* out, T* h_state,
                                                       const int64_t* lengths, int64_t t, int64_t r0, int64_t r1,
                                                       int64_t H) {
  for (int64_t b = r0; b < r1; ++b) {
    T* s = saved + b * 4 * H;  // r, z, n, W_hn h + b_hn
    T* ob = out + b * H;
    if (!counts(lengths, b, t)) {
      zero_row(s, 4 * H);
      zero_row(ob, H);
      continue;
    }
    const T* x = gi + b * 3 * H;
    const T* y = gh + b * 3 * H;
    T* hs = h_state + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T r = sigmoid_of(x[j] + y[j]), z = sigmoid_of(x[H + j] + y[H + j]), hn = y[2 * H + j];
      const T n = tanh_of(x[2 * H + j] + r * hn);
      s[j] = r;
      s[H + j] = z;
      s[2 * H + j] = n;
      s[3 * H + j] = hn;
      ob[j] = hs[j] = n + z * (hs[j] - n);
    }
  }
}

// Writes dgi, dgh [B, 3H] and leaves in dh the part of h_{t-1}'s gradient through z on counted
// rows (the caller adds dgh W_hh).
template <typename T>
inline __attribute__((always_inline)) void gru_backward(const T* grad_out, const T* saved, const T* out_prev,
                                                        const T* h0, T* dh, T* dgi, T* dgh, const int64_t* lengths,
                                                        int64_t t, int64_t prev, int64_t r0, int64_t r1, int64_t H) {
  for (int64_t b = r0; b < r1; ++b) {
    T* di = dgi + b * 3 * H;
    T* dj = dgh + b * 3 * H;
    if (!counts(lengths, b, t)) {
      zero_row(di, 3 * H);
      zero_row(dj, 3 * H);
      continue;
    }
    const T* s = saved + b * 4 * H;
    const T* go = grad_out + b * H;
    const T* hp = start_row(out_prev, h0, lengths, b, prev, H);
    T* dhb = dh + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T r = s[j], z = s[H + j], n = s[2 * H + j], hn = s[3 * H + j];
      const T dhv = dhb[j] + go[j];
      const T d_n = dhv * (1 - z) * (1 - n * n);
      const T d_z = dhv * (hp[j] - n) * z * (1 - z);
      const T d_r = d_n * hn * r * (1 - r);
      di[j] = dj[j] = d_r;
      di[H + j] = dj[H + j] = d_z;
      di[2 * H + j] = d_n;
      dj[2 * H + j] = d_n * r;
      dhb[j] = dhv * z;
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void rnn_forward(const T* pre, T* out, T* h_state, bool relu,
                                                       const int64_t* lengths, int64_t t, int64_t r0, int64_t r1,
                                                       int64_t H) {
  for (int64_t b = r0; b < r1; ++b) {
    T* ob = out + b * H;
    if (!counts(lengths, b, t)) {
      zero_row(ob, H);
      continue;
    }
    const T* p = pre + b * H;
    T* hs = h_state + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {  // (NaN stays NaN through the ReLU, as torch.relu)
      ob[j] = hs[j] = relu ? (p[j] < 0 ? T(0) : p[j]) : tanh_of(p[j]);
    }
  }
}

// Writes dg [B, H] and leaves dh = 0 on counted rows (the caller adds dg W_hh).
template <typename T>
inline __attribute__((always_inline)) void rnn_backward(const T* grad_out, const T* out, T* dh, T* dg, bool relu,
                                                        const int64_t* lengths, int64_t t, int64_t r0, int64_t r1,
                                                        int64_t H) {
  for (int64_t b = r0; b < r1; ++b) {
    T* d = dg + b * H;
    if (!counts(lengths, b, t)) {
      zero_row(d, H);
      continue;
    }
    const T* go = grad_out + b * H;
    const T* h = out + b * H;
    T* dhb = dh + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T dhv = dhb[j] + go[j];
      d[j] = relu ? (h[j] > 0 ? dhv : T(0)) : dhv * (1 - h[j] * h[j]);
      dhb[j] = 0;
    }
  }
}

// float32: an overload per cell compiled per instruction set (multiversion.h), preferred over the
// templates above, which float64 (tests, oracles) runs as they are.
DIVEBATCH_MULTIVERSION void lstm_forward(const float* pre, float* saved, float* cells, float* out, float* h_state,
                                         float* c_state, const int64_t* lengths, int64_t t, int64_t r0, int64_t r1,
                                         int64_t H) {
  lstm_forward<float>(pre, saved, cells, out, h_state, c_state, lengths, t, r0, r1, H);
}
DIVEBATCH_MULTIVERSION void lstm_backward(const float* grad_out, const float* saved, const float* cells_prev,
                                          const float* c0, float* dh, float* dc, float* dg, const int64_t* lengths,
                                          int64_t t, int64_t prev, int64_t r0, int64_t r1, int64_t H) {
  lstm_backward<float>(grad_out, saved, cells_prev, c0, dh, dc, dg, lengths, t, prev, r0, r1, H);
}
DIVEBATCH_MULTIVERSION void gru_forward(const float* gi, const float* gh, float* saved, float* out, float* h_state,
                                        const int64_t* lengths, int64_t t, int64_t r0, int64_t r1, int64_t H) {
  gru_forward<float>(gi, gh, saved, out, h_state, lengths, t, r0, r1, H);
}
DIVEBATCH_MULTIVERSION void gru_backward(const float* grad_out, const float* saved, const float* out_prev,
                                         const float* h0, float* dh, float* dgi, float* dgh, const int64_t* lengths,
                                         int64_t t, int64_t prev, int64_t r0, int64_t r1, int64_t H) {
  gru_backward<float>(grad_out, saved, out_prev, h0, dh, dgi, dgh, lengths, t, prev, r0, r1, H);
}
DIVEBATCH_MULTIVERSION void rnn_forward(const float* pre, float* out, float* h_state, bool relu,
                                        const int64_t* lengths, int64_t t, int64_t r0, int64_t r1, int64_t H) {
  rnn_forward<float>(pre, out, h_state, relu, lengths, t, r0, r1, H);
}
DIVEBATCH_MULTIVERSION void rnn_backward(const float* grad_out, const float* out, float* dh, float* dg, bool relu,
                                         const int64_t* lengths, int64_t t, int64_t r0, int64_t r1, int64_t H) {
  rnn_backward<float>(grad_out, out, dh, dg, relu, lengths, t, r0, r1, H);
}

// The batch rows of a step's cell split over threads only when there is enough of it: waking the
// threads costs more than a 16 x 256 LSTM cell (fwd + bwd of 64 steps took 19.4 ms split in two,
// 16.9 ms on one thread, against 12-13 ms for the step GEMMs alone).
constexpr int64_t kCellGrain = 16384;

// A projected LSTM step's h: the projection's rows become the output and the carried state on the
// rows whose step counts; a padded step's output is 0 and its state stays.
template <typename T>
void commit_rows(const T* projection, T* out, T* h_state, const int64_t* lengths, int64_t t, int64_t B, int64_t P) {
  for (int64_t b = 0; b < B; ++b) {
    if (counts(lengths, b, t)) {
      std::copy(projection + b * P, projection + (b + 1) * P, out + b * P);
      std::copy(projection + b * P, projection + (b + 1) * P, h_state + b * P);
    } else {
      zero_row(out + b * P, P);
    }
  }
}

// Backwards through a projected LSTM step: total = grad_out + the carried dh on counted rows (the
// gradient of the projected h, W_hr's factor), 0 on padded ones; dh's counted rows are reset (the
// caller adds their part through W_hh), its padded rows carried on.
template <typename T>
void take_rows(const T* grad_out, T* dh, T* total, const int64_t* lengths, int64_t t, int64_t B, int64_t P) {
  for (int64_t b = 0; b < B; ++b) {
    T* row = total + b * P;
    if (!counts(lengths, b, t)) {
      zero_row(row, P);
      continue;
    }
    for (int64_t j = 0; j < P; ++j) {
      row[j] = dh[b * P + j] + grad_out[b * P + j];
      dh[b * P + j] = 0;
    }
  }
}

// A PyTorch-style lengths vector [B] (int64, 0 <= lengths[b] <= T) as a contiguous CPU tensor,
// or an undefined tensor when none was given.
at::Tensor checked_lengths(const std::optional<at::Tensor>& lengths, int64_t B, int64_t T, const char* op) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 && l.size(0) == B, "divebatch::",
              op, ": lengths must be an int64 CPU tensor of shape [B] = [", B, "] (each sample's number of steps, "
              "as pad_packed_sequence returns it), got ", l.scalar_type(), " ", l.sizes(), " on ", l.device());
  at::Tensor c = l.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= T, "divebatch::", op, ": lengths[", b, "] = ", p[b],
                " is outside [0, T] = [0, ", T, "]");
  }
  return c;
}

template <typename F>
void over_rows(int64_t B, int64_t H, const F& f) {
  at::parallel_for(0, B, std::max<int64_t>(1, kCellGrain / std::max<int64_t>(1, H)), f);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_scan_cpu(
    const at::Tensor& gi, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
    c10::string_view mode_view, bool reverse) {
  constexpr const char* op = "recurrent_scan";
  const std::string mode(mode_view);
  const CellInfo info = cell_info(mode, op);
  const bool lstm = info.cell == Cell::kLSTM;
  TORCH_CHECK(gi.device().is_cpu(), "divebatch::", op, ": gi must be a CPU tensor, got device ", gi.device());
  TORCH_CHECK(gi.scalar_type() == at::kFloat || gi.scalar_type() == at::kDouble, "divebatch::", op,
              ": gi must be float32 or float64 (the recurrence is stepped in its dtype), got ", gi.scalar_type());
  TORCH_CHECK(gi.dim() == 3, "divebatch::", op, ": gi must be 3-D [B, T, G], got shape ", gi.sizes());
  const int64_t B = gi.size(0), T = gi.size(1), G = gi.size(2), H = G / info.gates;
  TORCH_CHECK(G % info.gates == 0, "divebatch::", op, ": gi's last dim must be ", info.gates,
              " x the hidden size for mode \"", mode, "\", got ", G);
  const bool projected = w_hr.has_value() && w_hr->defined();
  TORCH_CHECK(!projected || lstm, "divebatch::", op, ": w_hr (a projection) is for an LSTM only; pass None for mode \"",
              mode, "\"");
  const int64_t P = projected ? w_hr->size(0) : H;  // the width of h
  if (projected) check_tensor(*w_hr, gi, {P, H}, op, "w_hr", "[P, H]");
  check_tensor(w_hh, gi, {G, P}, op, "w_hh", projected ? "[G, P]" : "[G, H]");
  const bool has_bias = b_hh.has_value() && b_hh->defined();
  if (has_bias) check_tensor(*b_hh, gi, {G}, op, "b_hh", "[G]");
  check_tensor(h0, gi, {B, P}, op, "h0", projected ? "[B, P]" : "[B, H]");
  check_optional(c0, lstm, gi, {B, H}, op, "c0", "[B, H]", mode);
  const at::Tensor steps_of = checked_lengths(lengths, B, T, op);
  const int64_t* len = steps_of.defined() ? steps_of.const_data_ptr<int64_t>() : nullptr;

  BelowAutograd guard;
  const auto opts = gi.options();
  // Every result is time-major ([T, B, *], returned as [B, T, *] views) so that each step's slice
  // is contiguous: the step GEMM and the cell loops run fastest on those.
  at::Tensor out = at::empty({T, B, P}, opts);
  at::Tensor cells = at::empty(lstm ? at::IntArrayRef{T, B, H} : at::IntArrayRef{0}, opts);
  at::Tensor saved = at::empty({T, B, info.saved * H}, opts);
  // The step GEMM reads W_hh^T row by row: one transposed copy, not a strided read every step.
  const at::Tensor wt = w_hh.t().contiguous();
  const at::Tensor w_hr_t = projected ? w_hr->t().contiguous() : at::Tensor();
  // The input pre-activations, time-major and owned: LSTM and RNN add the step GEMM into them in
  // place, with b_hh folded in once (a GRU keeps W_hh h + b_hh apart: r multiplies its n part).
  at::Tensor pre = at::empty({T, B, G}, opts);
  if (has_bias && info.cell != Cell::kGRU) {
    at::add_out(pre, gi.transpose(0, 1), *b_hh);
  } else {
    pre.copy_(gi.transpose(0, 1));
  }
  at::Tensor gh = info.cell == Cell::kGRU ? at::empty({B, G}, opts) : at::Tensor();
  // The carried states (a padded step leaves them as they are; they end as h_n, c_n).
  at::Tensor h = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c = lstm ? c0->clone(at::MemoryFormat::Contiguous) : at::empty({0}, opts);
  // A projected LSTM's cell output o * tanh(c) before W_hr, and its projection.
  at::Tensor unprojected = projected ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor scratch = projected ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor projection = projected ? at::empty({B, P}, opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "recurrent_scan", [&] {
    scalar_t* h_state = h.mutable_data_ptr<scalar_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      at::Tensor pre_t = pre.select(0, t);
      const scalar_t* pre_rows = pre_t.const_data_ptr<scalar_t>();
      scalar_t* out_t = out.select(0, t).mutable_data_ptr<scalar_t>();
      scalar_t* saved_t = saved.select(0, t).mutable_data_ptr<scalar_t>();
      switch (info.cell) {
        case Cell::kLSTM: {
          pre_t.addmm_(h, wt);
          scalar_t* cells_t = cells.select(0, t).mutable_data_ptr<scalar_t>();
          scalar_t* c_state = c.mutable_data_ptr<scalar_t>();
          // (projected: the cell's output goes to a scratch, projected and committed below)
          scalar_t* cell_out = projected ? unprojected.mutable_data_ptr<scalar_t>() : out_t;
          scalar_t* cell_state = projected ? scratch.mutable_data_ptr<scalar_t>() : h_state;
          over_rows(B, H, [&](int64_t r0, int64_t r1) {
            lstm_forward(pre_rows, saved_t, cells_t, cell_out, cell_state, c_state, len, t, r0, r1, H);
          });
          if (projected) {
            at::mm_out(projection, unprojected, w_hr_t);
            commit_rows(projection.const_data_ptr<scalar_t>(), out_t, h_state, len, t, B, P);
          }
          break;
        }
        case Cell::kGRU:
          if (has_bias) {
            at::addmm_out(gh, *b_hh, h, wt);
          } else {
            at::mm_out(gh, h, wt);
          }
          over_rows(B, H, [&](int64_t r0, int64_t r1) {
            gru_forward(pre_rows, gh.const_data_ptr<scalar_t>(), saved_t, out_t, h_state, len, t, r0, r1, H);
          });
          break;
        case Cell::kTanh:
        case Cell::kReLU:
          pre_t.addmm_(h, wt);
          over_rows(B, H, [&](int64_t r0, int64_t r1) {
            rnn_forward(pre_rows, out_t, h_state, info.cell == Cell::kReLU, len, t, r0, r1, H);
          });
          break;
      }
    }
  });
  return {out.transpose(0, 1), lstm ? cells.transpose(0, 1) : cells, saved.transpose(0, 1), h, c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_scan_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h_n, const std::optional<at::Tensor>& grad_c_n,
    const at::Tensor& w_hh, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& out, const at::Tensor& cells, const at::Tensor& saved,
    const std::optional<at::Tensor>& lengths, c10::string_view mode_view, bool reverse) {
  constexpr const char* op = "recurrent_scan_backward";
  const std::string mode(mode_view);
  const CellInfo info = cell_info(mode, op);
  const bool lstm = info.cell == Cell::kLSTM;
  TORCH_CHECK(out.device().is_cpu(), "divebatch::", op, ": out must be a CPU tensor, got device ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, "divebatch::", op,
              ": out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 3, "divebatch::", op, ": out must be 3-D [B, T, H], got shape ", out.sizes());
  const bool projected = w_hr.has_value() && w_hr->defined();
  TORCH_CHECK(!projected || lstm, "divebatch::", op, ": w_hr (a projection) is for an LSTM only; pass None for mode \"",
              mode, "\"");
  const int64_t B = out.size(0), T = out.size(1), P = out.size(2);
  const int64_t H = projected ? w_hr->size(1) : P, G = info.gates * H;
  if (projected) check_tensor(*w_hr, out, {P, H}, op, "w_hr", "[P, H]");
  check_tensor(grad_out, out, {B, T, P}, op, "grad_out", "[B, T, H]");
  if (grad_h_n.has_value() && grad_h_n->defined()) check_tensor(*grad_h_n, out, {B, P}, op, "grad_h_n", "[B, H]");
  if (lstm) {
    if (grad_c_n.has_value() && grad_c_n->defined()) {
      check_tensor(*grad_c_n, out, {B, H}, op, "grad_c_n", "[B, H]");
    }
  } else {
    check_optional(grad_c_n, false, out, {B, H}, op, "grad_c_n", "[B, H]", mode);
  }
  check_tensor(w_hh, out, {G, P}, op, "w_hh", projected ? "[G, P]" : "[G, H]");
  check_tensor(h0, out, {B, P}, op, "h0", "[B, H]");
  check_optional(c0, lstm, out, {B, H}, op, "c0", "[B, H]", mode);
  if (lstm) {
    check_tensor(cells, out, {B, T, H}, op, "cells", "[B, T, H]");
  }
  check_tensor(saved, out, {B, T, info.saved * H}, op, "saved", "[B, T, k H]");
  const at::Tensor steps_of = checked_lengths(lengths, B, T, op);
  const int64_t* len = steps_of.defined() ? steps_of.const_data_ptr<int64_t>() : nullptr;

  BelowAutograd guard;
  const auto opts = out.options();
  // Time-major, as in the forward, so each step's rows are contiguous for the cell loops: no copy
  // for recurrent_scan_cpu's own results, nor for an incoming gradient that already is (the
  // next layer's input gradient).
  const at::Tensor out_steps = out.transpose(0, 1).contiguous(), saved_steps = saved.transpose(0, 1).contiguous();
  const at::Tensor cells_steps = lstm ? cells.transpose(0, 1).contiguous() : cells;
  const at::Tensor grad_out_steps = grad_out.transpose(0, 1).contiguous();
  const at::Tensor h_init = h0.contiguous();
  const at::Tensor c_init = lstm ? c0->contiguous() : at::Tensor();
  at::Tensor grad_gi = at::empty({T, B, G}, opts);
  at::Tensor grad_gh = at::empty(info.cell == Cell::kGRU ? at::IntArrayRef{T, B, G} : at::IntArrayRef{0}, opts);
  at::Tensor dh = grad_h_n.has_value() && grad_h_n->defined() ? grad_h_n->clone(at::MemoryFormat::Contiguous)
                                                              : at::zeros({B, P}, opts);
  at::Tensor dc = at::empty({0}, opts);
  if (lstm) {
    dc = grad_c_n.has_value() && grad_c_n->defined() ? grad_c_n->clone(at::MemoryFormat::Contiguous)
                                                     : at::zeros({B, H}, opts);
  }
  // A projected LSTM: the gradient of every step's projected h (W_hr's factor), that of the
  // cell's output before W_hr, and a zero carry for the cell loop (the carry lives in dh).
  at::Tensor grad_projected = at::empty(projected ? at::IntArrayRef{T, B, P} : at::IntArrayRef{0}, opts);
  at::Tensor d_cell = projected ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor no_carry = projected ? at::zeros({B, H}, opts) : at::Tensor();

  // The steps in the opposite order of the forward; `prev` is the step before t in the forward.
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "recurrent_scan_backward", [&] {
    scalar_t* dh_rows = dh.mutable_data_ptr<scalar_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;
      const int64_t prev = reverse ? t + 1 : t - 1;
      const bool has_prev = prev >= 0 && prev < T;
      const scalar_t* go = grad_out_steps.select(0, t).const_data_ptr<scalar_t>();
      const scalar_t* saved_t = saved_steps.select(0, t).const_data_ptr<scalar_t>();
      at::Tensor dg = grad_gi.select(0, t);
      scalar_t* dg_rows = dg.mutable_data_ptr<scalar_t>();
      switch (info.cell) {
        case Cell::kLSTM: {
          const scalar_t* cells_prev = has_prev ? cells_steps.select(0, prev).const_data_ptr<scalar_t>() : nullptr;
          const scalar_t* cell_grad = go;  // the gradient arriving at the cell's output this step
          scalar_t* carry = dh_rows;
          if (projected) {  // through W_hr first: d(o tanh c) = (dh + grad_out) W_hr
            at::Tensor total = grad_projected.select(0, t);
            take_rows(go, dh_rows, total.mutable_data_ptr<scalar_t>(), len, t, B, P);
            at::mm_out(d_cell, total, *w_hr);
            cell_grad = d_cell.const_data_ptr<scalar_t>();
            carry = no_carry.mutable_data_ptr<scalar_t>();
          }
          over_rows(B, H, [&](int64_t r0, int64_t r1) {
            lstm_backward(cell_grad, saved_t, cells_prev, c_init.const_data_ptr<scalar_t>(), carry,
                          dc.mutable_data_ptr<scalar_t>(), dg_rows, len, t, prev, r0, r1, H);
          });
          dh.addmm_(dg, w_hh);
          break;
        }
        case Cell::kGRU: {
          const scalar_t* out_prev = has_prev ? out_steps.select(0, prev).const_data_ptr<scalar_t>() : nullptr;
          at::Tensor dgh = grad_gh.select(0, t);
          over_rows(B, H, [&](int64_t r0, int64_t r1) {
            gru_backward(go, saved_t, out_prev, h_init.const_data_ptr<scalar_t>(), dh_rows, dg_rows,
                         dgh.mutable_data_ptr<scalar_t>(), len, t, prev, r0, r1, H);
          });
          dh.addmm_(dgh, w_hh);
          break;
        }
        case Cell::kTanh:
        case Cell::kReLU: {
          const scalar_t* out_t = out_steps.select(0, t).const_data_ptr<scalar_t>();
          over_rows(B, H, [&](int64_t r0, int64_t r1) {
            rnn_backward(go, out_t, dh_rows, dg_rows, info.cell == Cell::kReLU, len, t, r0, r1, H);
          });
          dh.addmm_(dg, w_hh);
          break;
        }
      }
    }
  });
  return {grad_gi.transpose(0, 1), info.cell == Cell::kGRU ? grad_gh.transpose(0, 1) : grad_gh, dh, dc,
          projected ? grad_projected.transpose(0, 1) : grad_projected};
}

}  // namespace divebatch

// The schemas live in divebatch/ops.py (torch.library); here only the CPU implementations.
TORCH_LIBRARY_IMPL(divebatch, CPU, m) {
  m.impl("recurrent_scan", &divebatch::recurrent_scan_cpu);
  m.impl("recurrent_scan_backward", &divebatch::recurrent_scan_backward_cpu);
}

// C++ CPU kernels of the divebatch::* operators.
//
// The operators are declared once, from Python (divebatch/ops.py, SCHEMAS); this library only
// registers CPU implementations for them (TORCH_LIBRARY_IMPL(divebatch, CPU, m)). The functions
// below are exported as well so C++ code (tests/cpp/test_ops.cpp) can call them directly.
//
// Shapes, per sample b: a is a layer input [B, T, d], g the gradient of the loss with respect to
// the layer output [B, T, p]; the per-sample weight gradient is g_b^T a_b [p, d]. Inputs may be
// float32, float16, bfloat16 (or float64) with any strides; every result is float32 computed
// with float32 (or wider) accumulation. No loss-scaling factor is applied (DESIGN §2).
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace divebatch {

// Per-sample ||g_b^T a_b||_F^2 by the Gram identity <a_b a_b^T, g_b g_b^T>, summed over the
// upper-triangular pairs of T x T tiles (off-diagonal pairs counted twice), so no Gram larger
// than one tile is ever held. Returns (weight_sq [B], bias_sq [B]) with
// bias_sq = ||sum_t g_b[t]||^2, or zeros when with_bias is false.
std::tuple<at::Tensor, at::Tensor> ghost_norm_cpu(const at::Tensor& a, const at::Tensor& g, bool with_bias);

// Per-sample ||g_b^T a_b||_F^2 by forming each p x d gradient. Returns
// (weight_sq [B], bias_sq [B], weight_grad_sum [p, d] = sum_b g_b^T a_b).
std::tuple<at::Tensor, at::Tensor, at::Tensor> instantiate_norm_cpu(const at::Tensor& a, const at::Tensor& g,
                                                                    bool with_bias);

// instantiate_norm of a one-group convolution of x [B, C, *in] (1-3 spatial dims, zero padding)
// with output grad g [B, O, *out]: (weight_sq [B], weight_grad_sum [O, C * prod(kernel_size)]), the
// patches unfolded on CPU.
std::tuple<at::Tensor, at::Tensor> conv_instantiate_norm_cpu(const at::Tensor& x, const at::Tensor& g,
                                                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation);
// ghost_norm of the same convolution's patches: weight_sq [B] (unfolded on CPU).
at::Tensor conv_ghost_norm_cpu(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// T = 1 closed form for a [B, d], g [B, p]: (||a_b||^2 ||g_b||^2 [B], ||g_b||^2 or zeros [B]).
std::tuple<at::Tensor, at::Tensor> outer_norm_cpu(const at::Tensor& a, const at::Tensor& g, bool with_bias);

// Per-sample squared norm of an embedding table's gradient, indices [B, T] (int64 or int32),
// g [B, T, p]: sum over distinct indices u != padding_idx of ||sum_{t: idx_t = u} g_b[t]||^2.
// padding_idx < 0 means no padding row.
at::Tensor embedding_norm_cpu(const at::Tensor& indices, const at::Tensor& g, int64_t padding_idx);
// Per-sample gradients of a LayerNorm's (rms false) or RMSNorm's (rms true) affine parameters,
// x and g [B, R, d] normalised over d: x_hat = (x - mean) / sqrt(var + eps) (biased variance) or
// x / sqrt(mean(x^2) + eps), in float32 from statistics taken in double. Returns
// (weight [B, d] = sum_r x_hat[b, r] * g[b, r], bias [B, d] = sum_r g[b, r], zeros without bias).
// round_x_hat: x_hat rounded to x's dtype first (Hugging Face's Llama RMSNorm casts it back).
std::tuple<at::Tensor, at::Tensor> affine_norm_grads_cpu(const at::Tensor& x, const at::Tensor& g, bool rms,
                                                         double eps, bool with_bias, bool round_x_hat);
// Per-sample gradients of a GroupNorm's affine parameters (an InstanceNorm's with groups = C),
// x and g [B, C, S] (S the positions, flattened): x_hat normalised by the mean and biased variance
// of each sample's group of C / groups channels over all positions (taken in double). Returns
// (weight [B, C] = sum_s x_hat * g, bias [B, C] = sum_s g, zeros without bias).
std::tuple<at::Tensor, at::Tensor> group_norm_grads_cpu(const at::Tensor& x, const at::Tensor& g, int64_t groups,
                                                        double eps, bool with_bias);
// Per-sample gradients of a BatchNorm's affine parameters (an InstanceNorm's with running
// statistics), x and g [B, C, S]: x_hat = (x - mean[c]) / sqrt(var[c] + eps) with mean and var
// [C] given (running statistics) or, both none, the batch's (over samples and positions, biased
// variance, taken in double). Returns (weight [B, C] = sum_s x_hat * g, bias [B, C] = sum_s g,
// zeros without bias); sums in float32 chunks added in double.
std::tuple<at::Tensor, at::Tensor> channel_norm_grads_cpu(const at::Tensor& x, const at::Tensor& g,
                                                          const std::optional<at::Tensor>& mean,
                                                          const std::optional<at::Tensor>& var, double eps,
                                                          bool with_bias);

// One direction of one nn.RNN / nn.LSTM / nn.GRU layer (recurrent_scan_cpu.cpp). gi [B, T, G] is
// the input projection x W_ih^T + b_ih of every step (G = 4H LSTM, 3H GRU, H RNN), w_hh [G, P],
// b_hh [G] or none, h0 [B, P], c0 [B, H] for an LSTM only, w_hr [P, H] an LSTM's projection
// (h = W_hr (o * tanh c); none: P = H); lengths [B] (int64) or none: sample b's steps
// t >= lengths[b] are padding (a PackedSequence's), its output there 0 and its state carried
// unchanged; mode is the module's .mode ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"); reverse steps
// from T - 1 down. float32 or float64, computed in that dtype. Returns (out [B, T, P]: h after
// every step; cells [B, T, H]: an LSTM's c after every step, else empty; saved [B, T, k H]: the
// activations the backward needs, k = 5 LSTM (i, f, g, o, tanh c), 4 GRU (r, z, n,
// W_hn h + b_hn), 0 RNN; h_n [B, P]; c_n [B, H] for an LSTM, else empty), the first three as
// views of time-major buffers.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_scan_cpu(
    const at::Tensor& gi, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
    c10::string_view mode, bool reverse);

// The gradients of recurrent_scan from those of out [B, T, P] and the final states (grad_h_n
// [B, P], grad_c_n [B, H], none meaning zero): (grad_gi [B, T, G], grad_gh [B, T, G] for a GRU
// (the gradient of W_hh h + b_hh; for LSTM and RNN it equals grad_gi and is returned empty),
// grad_h0 [B, P], grad_c0 [B, H] for an LSTM, else empty, grad_projected [B, T, P]: with w_hr,
// the gradient of every step's projected h, else empty). Padded steps get zero gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrent_scan_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h_n, const std::optional<at::Tensor>& grad_c_n,
    const at::Tensor& w_hh, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& out, const at::Tensor& cells, const at::Tensor& saved,
    const std::optional<at::Tensor>& lengths, c10::string_view mode, bool reverse);

}  // namespace divebatch

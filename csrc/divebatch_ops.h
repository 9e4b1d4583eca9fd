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

#include <cstdint>
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

// T = 1 closed form for a [B, d], g [B, p]: (||a_b||^2 ||g_b||^2 [B], ||g_b||^2 or zeros [B]).
std::tuple<at::Tensor, at::Tensor> outer_norm_cpu(const at::Tensor& a, const at::Tensor& g, bool with_bias);

// Per-sample squared norm of an embedding table's gradient, indices [B, T] (int64 or int32),
// g [B, T, p]: sum over distinct indices u != padding_idx of ||sum_{t: idx_t = u} g_b[t]||^2.
// padding_idx < 0 means no padding row.
at::Tensor embedding_norm_cpu(const at::Tensor& indices, const at::Tensor& g, int64_t padding_idx);

}  // namespace divebatch

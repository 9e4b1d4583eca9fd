// C++ tests of the divebatch CPU kernels (csrc/), run by ctest (tests/cpp/run_ctest.sh).
//
// Each *_cpu function is called directly (no dispatcher, no Python) and compared with a naive
// float64 loop over the explicit per-sample gradients M_b = sum_t g_b[t] a_b[t]^T. Low-precision
// inputs are compared with the naive loop over the same rounded values, so the only difference
// left is float32 accumulation.
#include "divebatch_ops.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// max |x - y| <= rtol * max |y| + atol (a scale-aware relative error).
void expect_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what,
                  double rtol = 1e-4, double atol = 1e-6) {
  const at::Tensor x = actual.to(at::kDouble), y = expected.to(at::kDouble);
  if (x.sizes() != y.sizes()) {
    expect(false, what + ": shape mismatch");
    return;
  }
  if (x.numel() == 0) {
    expect(true, what);
    return;
  }
  const double err = (x - y).abs().max().item<double>();
  const double scale = y.abs().max().item<double>();
  const bool ok = err <= rtol * scale + atol;
  if (!ok) {
    std::printf("  %s: max abs err %.3g, max |expected| %.3g\n", what.c_str(), err, scale);
  }
  expect(ok, what);
}

void expect_throws(const std::function<void()>& fn, const std::string& needle, const std::string& what) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    const bool ok = msg.find(needle) != std::string::npos;
    if (!ok) {
      std::printf("  %s: message lacks '%s': %s\n", what.c_str(), needle.c_str(), msg.c_str());
    }
    expect(ok, what);
    return;
  }
  expect(false, what + ": no exception");
}

struct Naive {
  at::Tensor weight_sq, bias_sq, grad_sum;
};

// Explicit per-sample gradients in float64 loops.
Naive naive_linear(const at::Tensor& a_in, const at::Tensor& g_in) {
  const at::Tensor a = a_in.to(at::kDouble).contiguous(), g = g_in.to(at::kDouble).contiguous();
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  auto A = a.accessor<double, 3>();
  auto G = g.accessor<double, 3>();
  Naive out{at::zeros({B}, at::kDouble), at::zeros({B}, at::kDouble), at::zeros({p, d}, at::kDouble)};
  auto W = out.weight_sq.accessor<double, 1>();
  auto Bs = out.bias_sq.accessor<double, 1>();
  auto S = out.grad_sum.accessor<double, 2>();
  std::vector<double> m(p * d), bias(p);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(m.begin(), m.end(), 0.0);
    std::fill(bias.begin(), bias.end(), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < p; ++k) {
        bias[k] += G[b][t][k];
        for (int64_t c = 0; c < d; ++c) {
          m[k * d + c] += G[b][t][k] * A[b][t][c];
        }
      }
    }
    for (int64_t k = 0; k < p; ++k) {
      Bs[b] += bias[k] * bias[k];
      for (int64_t c = 0; c < d; ++c) {
        W[b] += m[k * d + c] * m[k * d + c];
        S[k][c] += m[k * d + c];
      }
    }
  }
  return out;
}

at::Tensor naive_embedding(const at::Tensor& indices, const at::Tensor& g_in, int64_t padding_idx) {
  const at::Tensor g = g_in.to(at::kDouble).contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t B = g.size(0), T = g.size(1), p = g.size(2);
  auto G = g.accessor<double, 3>();
  auto I = idx.accessor<int64_t, 2>();
  at::Tensor out = at::zeros({B}, at::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    std::map<int64_t, std::vector<double>> rows;
    for (int64_t t = 0; t < T; ++t) {
      if (padding_idx >= 0 && I[b][t] == padding_idx) {
        continue;
      }
      auto& row = rows[I[b][t]];
      row.resize(p, 0.0);
      for (int64_t k = 0; k < p; ++k) {
        row[k] += G[b][t][k];
      }
    }
    double total = 0.0;
    for (const auto& [u, row] : rows) {
      for (double v : row) {
        total += v * v;
      }
    }
    out[b] = total;
  }
  return out;
}

std::string shape_name(int64_t B, int64_t T, int64_t d, int64_t p, const std::string& tag) {
  return tag + " B=" + std::to_string(B) + " T=" + std::to_string(T) + " d=" + std::to_string(d) +
         " p=" + std::to_string(p);
}

void test_linear_ops(int64_t B, int64_t T, int64_t d, int64_t p, at::ScalarType dtype, bool transposed) {
  const std::string name = shape_name(B, T, d, p, std::string(c10::toString(dtype)) + (transposed ? " (strided)" : ""));
  at::Tensor a, g;
  if (transposed) {  // [B, d, T] storage seen as [B, T, d]: neither last-dim-contiguous nor dense per row
    a = at::randn({B, d, T}).to(dtype).transpose(1, 2);
    g = at::randn({B, p, T}).to(dtype).transpose(1, 2);
  } else {
    a = at::randn({B, T, d}).to(dtype);
    g = at::randn({B, T, p}).to(dtype);
  }
  const Naive want = naive_linear(a, g);
  const double rtol = 1e-4;

  auto [gw, gb] = divebatch::ghost_norm_cpu(a, g, true);
  expect_close(gw, want.weight_sq, "ghost_norm weight " + name, rtol);
  expect_close(gb, want.bias_sq, "ghost_norm bias " + name, rtol);
  expect(gw.scalar_type() == at::kFloat && gw.sizes() == at::IntArrayRef{B}, "ghost_norm float32 [B] " + name);
  auto [gw0, gb0] = divebatch::ghost_norm_cpu(a, g, false);
  expect_close(gw0, want.weight_sq, "ghost_norm weight (no bias) " + name, rtol);
  expect(B == 0 || gb0.abs().max().item<double>() == 0.0, "ghost_norm bias zeros " + name);

  auto [iw, ib, is] = divebatch::instantiate_norm_cpu(a, g, true);
  expect_close(iw, want.weight_sq, "instantiate_norm weight " + name, rtol);
  expect_close(ib, want.bias_sq, "instantiate_norm bias " + name, rtol);
  expect_close(is, want.grad_sum, "instantiate_norm grad sum " + name, rtol);

  if (T >= 1) {
    const at::Tensor a1 = a.select(1, 0), g1 = g.select(1, 0);
    const Naive want1 = naive_linear(a1.unsqueeze(1), g1.unsqueeze(1));
    auto [ow, ob] = divebatch::outer_norm_cpu(a1, g1, true);
    expect_close(ow, want1.weight_sq, "outer_norm weight " + name, rtol);
    expect_close(ob, want1.bias_sq, "outer_norm bias " + name, rtol);
  }
}

void test_embedding(int64_t B, int64_t T, int64_t p, int64_t vocab, int64_t padding_idx, at::ScalarType dtype,
                    at::ScalarType index_dtype) {
  const at::Tensor idx = at::randint(vocab, {B, T}, at::TensorOptions().dtype(index_dtype));
  const at::Tensor g = at::randn({B, T, p}).to(dtype);
  const std::string name = "embedding_norm B=" + std::to_string(B) + " T=" + std::to_string(T) +
                           " p=" + std::to_string(p) + " vocab=" + std::to_string(vocab) +
                           " padding_idx=" + std::to_string(padding_idx) + " " + c10::toString(dtype) + " " +
                           c10::toString(index_dtype);
  expect_close(divebatch::embedding_norm_cpu(idx, g, padding_idx), naive_embedding(idx, g, padding_idx), name);
}

// Naive float64 loop: each row normalised by its mean and biased variance (LayerNorm) or its root
// mean square (RMSNorm), multiplied by its output grad, summed over the rows of each sample.
std::pair<at::Tensor, at::Tensor> naive_affine_norm(const at::Tensor& x_in, const at::Tensor& g_in, bool rms,
                                                    double eps) {
  const at::Tensor x = x_in.to(at::kDouble).contiguous(), g = g_in.to(at::kDouble).contiguous();
  const int64_t B = x.size(0), R = x.size(1), d = x.size(2);
  at::Tensor weight = at::zeros({B, d}, at::kDouble), bias = at::zeros({B, d}, at::kDouble);
  const double* px = x.const_data_ptr<double>();
  const double* pg = g.const_data_ptr<double>();
  double* pw = weight.data_ptr<double>();
  double* pb = bias.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < R; ++r) {
      const double* row = px + (b * R + r) * d;
      const double* grow = pg + (b * R + r) * d;
      double mean = 0.0, ss = 0.0;
      if (!rms) {
        for (int64_t k = 0; k < d; ++k) mean += row[k] / d;
      }
      for (int64_t k = 0; k < d; ++k) ss += (row[k] - mean) * (row[k] - mean) / d;
      for (int64_t k = 0; k < d; ++k) {
        pw[b * d + k] += (row[k] - mean) / std::sqrt(ss + eps) * grow[k];
        pb[b * d + k] += grow[k];
      }
    }
  }
  return {weight, bias};
}

void test_affine_norm(int64_t B, int64_t R, int64_t d, bool rms, at::ScalarType dtype, bool transposed) {
  at::Tensor x = (at::randn({B, R, d}) * 3 + 2).to(dtype), g = at::randn({B, R, d}).to(dtype);
  if (transposed) {  // inner stride != 1
    x = x.transpose(1, 2).contiguous().transpose(1, 2);
  }
  const std::string name = std::string(rms ? "rmsnorm" : "layernorm") + " B=" + std::to_string(B) +
                           " R=" + std::to_string(R) + " d=" + std::to_string(d) + " " + c10::toString(dtype) +
                           (transposed ? " transposed" : "");
  const auto [weight, bias] = divebatch::affine_norm_grads_cpu(x, g, rms, 1e-5, true, false);
  const auto [want_w, want_b] = naive_affine_norm(x, g, rms, 1e-5);
  expect_close(weight, want_w, "affine_norm_grads weight " + name, 1e-5);
  expect_close(bias, want_b, "affine_norm_grads bias " + name, 1e-5);
  expect(B * d == 0 ||
             std::get<1>(divebatch::affine_norm_grads_cpu(x, g, rms, 1e-5, false, false)).abs().max().item<double>() == 0.0,
         "affine_norm_grads without bias gives zeros " + name);
}

// Naive float64 loop: each sample's group of channels normalised by its mean and biased variance;
// channels_last stores x and g [B, S, C].
void test_group_norm(int64_t B, int64_t C, int64_t S, int64_t groups, at::ScalarType dtype,
                     bool channels_last = false) {
  const auto make = [&] { return channels_last ? at::randn({B, S, C}).transpose(1, 2) : at::randn({B, C, S}); };
  const at::Tensor x = (make() * 3 + 2).to(dtype), g = make().to(dtype);
  const at::Tensor xd = x.to(at::kDouble), gd = g.to(at::kDouble);
  at::Tensor want_w = at::zeros({B, C}, at::kDouble), want_b = at::zeros({B, C}, at::kDouble);
  const int64_t per = C / groups;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t q = 0; q < groups; ++q) {
      const at::Tensor part = xd[b].narrow(0, q * per, per);
      const double mean = part.mean().item<double>();
      const double var = (part - mean).pow(2).mean().item<double>();
      for (int64_t c = q * per; c < (q + 1) * per; ++c) {
        want_w[b][c] = ((xd[b][c] - mean) / std::sqrt(var + 1e-5) * gd[b][c]).sum();
        want_b[b][c] = gd[b][c].sum();
      }
    }
  }
  const std::string name = "group_norm_grads B=" + std::to_string(B) + " C=" + std::to_string(C) + " S=" +
                           std::to_string(S) + " groups=" + std::to_string(groups) +
                           (channels_last ? " channels-last " : " ") + c10::toString(dtype);
  const auto [weight, bias] = divebatch::group_norm_grads_cpu(x, g, groups, 1e-5, true);
  expect_close(weight, want_w, name + " weight", 1e-5);
  expect_close(bias, want_b, name + " bias", 1e-5);
}

// Naive float64 loop: each channel normalised by the running statistics given or, without them,
// by the mean and biased variance over the whole batch; channels_last stores x and g [B, S, C].
void test_channel_norm(int64_t B, int64_t C, int64_t S, bool running, bool channels_last, at::ScalarType dtype) {
  const auto make = [&](double scale, double shift) {
    const at::Tensor t = channels_last ? at::randn({B, S, C}).transpose(1, 2) : at::randn({B, C, S});
    return (t * scale + shift).to(dtype);
  };
  const at::Tensor x = make(0.5, 40.0), g = make(1.0, 0.0);  // mean 80 times the spread
  const at::Tensor xd = x.to(at::kDouble), gd = g.to(at::kDouble);
  const at::Tensor mean = running ? at::randn({C}) + 39.5 : xd.mean({0, 2});
  const at::Tensor var = running ? at::rand({C}) * 0.5 + 0.1 : (xd - mean.view({1, C, 1})).pow(2).mean({0, 2});
  const at::Tensor x_hat = (xd - mean.to(at::kDouble).view({1, C, 1})) / (var.to(at::kDouble).view({1, C, 1}) + 1e-5).sqrt();
  const at::Tensor want_w = (x_hat * gd).sum(2), want_b = gd.sum(2);
  const std::string name = "channel_norm_grads B=" + std::to_string(B) + " C=" + std::to_string(C) + " S=" +
                           std::to_string(S) + (running ? " running" : " batch") +
                           (channels_last ? " channels-last " : " ") + c10::toString(dtype);
  const auto [weight, bias] = running ? divebatch::channel_norm_grads_cpu(x, g, mean, var, 1e-5, true)
                                      : divebatch::channel_norm_grads_cpu(x, g, std::nullopt, std::nullopt, 1e-5, true);
  expect_close(weight, want_w, name + " weight", 1e-5);
  expect_close(bias, want_b, name + " bias", 1e-5);
}

void test_bad_inputs() {
  const at::Tensor a = at::randn({4, 5, 3}), g = at::randn({4, 5, 2});
  expect_throws([&] { divebatch::ghost_norm_cpu(a, at::randn({3, 5, 2}), false); }, "batch size B",
                "ghost_norm rejects mismatched B");
  expect_throws([&] { divebatch::instantiate_norm_cpu(a, at::randn({4, 6, 2}), false); }, "number of positions T",
                "instantiate_norm rejects mismatched T");
  expect_throws([&] { divebatch::ghost_norm_cpu(a.select(1, 0), g, false); }, "a must be 3-D",
                "ghost_norm rejects 2-D a");
  expect_throws([&] { divebatch::outer_norm_cpu(a, g, false); }, "a must be 2-D", "outer_norm rejects 3-D a");
  expect_throws([&] { divebatch::ghost_norm_cpu(a, g.to(at::kLong), false); }, "g must be a floating-point",
                "ghost_norm rejects integer g");
  expect_throws([&] { divebatch::embedding_norm_cpu(at::zeros({4, 5}), g, -1); }, "indices must be an integer",
                "embedding_norm rejects float indices");
  expect_throws([&] { divebatch::embedding_norm_cpu(at::zeros({4, 6}, at::kLong), g, -1); }, "number of positions T",
                "embedding_norm rejects mismatched T");
  const at::Tensor g_meta = at::empty({4, 5, 2}, at::TensorOptions().device(at::kMeta));
  expect_throws([&] { divebatch::ghost_norm_cpu(a, g_meta, false); }, "g must be on the same device as a",
                "ghost_norm rejects g on another device");
  expect_throws([&] { divebatch::instantiate_norm_cpu(a.to(at::kMeta), g_meta, false); }, "a must be a CPU tensor",
                "instantiate_norm rejects non-CPU a");
  expect_throws([&] { divebatch::affine_norm_grads_cpu(a, g, false, 1e-5, true, false); }, "g must have the same width d",
                "affine_norm_grads rejects g of another width");
  expect_throws([&] { divebatch::group_norm_grads_cpu(a, a, 2, 1e-5, true); }, "groups=2 must divide the 5 channels",
                "group_norm_grads rejects groups that do not divide C");
  expect_throws([&] { divebatch::channel_norm_grads_cpu(a, a, at::zeros({5}), std::nullopt, 1e-5, true); },
                "give both mean and var", "channel_norm_grads rejects a mean without a var");
  expect_throws([&] { divebatch::channel_norm_grads_cpu(a, a, at::zeros({5}), at::ones({4}), 1e-5, true); },
                "var must be 1-D with one entry per channel of x (5)", "channel_norm_grads rejects a var of 4");
}

}  // namespace

int main() {
  at::manual_seed(0);
  // (B, T, d, p): T = 1; B = 1; odd T crossing the 256 tile; B = 1 with T crossing the smaller
  // tiles chosen for small batches; more samples than threads; an empty batch; T = 0.
  const std::vector<std::vector<int64_t>> shapes = {
      {3, 7, 5, 4}, {4, 1, 6, 3}, {1, 9, 4, 5}, {2, 257, 9, 6}, {1, 301, 12, 10}, {9, 33, 17, 70}, {0, 5, 3, 2},
      {2, 0, 3, 2}};
  for (const auto& s : shapes) {
    test_linear_ops(s[0], s[1], s[2], s[3], at::kFloat, false);
  }
  test_linear_ops(2, 130, 7, 5, at::kFloat, true);
  test_linear_ops(300, 6, 5, 4, at::kFloat, false);  // many small samples: batched GEMM per item
  test_linear_ops(3, 67, 8, 6, at::kHalf, false);
  test_linear_ops(2, 45, 8, 6, at::kBFloat16, true);
  test_linear_ops(2, 19, 5, 3, at::kDouble, false);

  test_embedding(3, 17, 5, 4, -1, at::kFloat, at::kLong);
  test_embedding(3, 17, 5, 4, 2, at::kFloat, at::kLong);
  test_embedding(1, 1, 3, 2, 0, at::kFloat, at::kLong);
  test_embedding(2, 64, 8, 1000, 7, at::kHalf, at::kInt);
  test_embedding(5, 40, 6, 3, 1, at::kBFloat16, at::kLong);
  test_embedding(0, 4, 3, 2, -1, at::kFloat, at::kLong);

  // (B, R, d): one element; rows wider than the SIMD lanes; B = 1 with rows split into blocks.
  for (const bool rms : {false, true}) {
    test_affine_norm(3, 7, 5, rms, at::kFloat, false);
    test_affine_norm(1, 1, 1, rms, at::kFloat, false);
    test_affine_norm(2, 9, 67, rms, at::kFloat, true);
    test_affine_norm(1, 301, 12, rms, at::kFloat, false);
    test_affine_norm(4, 20, 33, rms, at::kBFloat16, false);
    test_affine_norm(0, 4, 3, rms, at::kFloat, false);
  }

  test_group_norm(3, 8, 37, 2, at::kFloat);
  test_group_norm(2, 6, 1, 6, at::kFloat);
  test_group_norm(1, 4, 300, 1, at::kFloat);
  test_group_norm(2, 8, 20, 4, at::kBFloat16);
  test_group_norm(3, 8, 300, 2, at::kFloat, true);  // channels-last lanes, crossing 128 positions
  test_group_norm(2, 6, 9, 6, at::kHalf, true);
  // (B, C, S): rows crossing the 1024-element chunk; one position (BatchNorm1d); channels-last
  // crossing the 128-position chunk; 16-bit.
  for (const bool running : {false, true}) {
    test_channel_norm(3, 5, 1100, running, false, at::kFloat);
    test_channel_norm(16, 7, 1, running, false, at::kFloat);
    test_channel_norm(2, 9, 300, running, true, at::kFloat);
    test_channel_norm(2, 6, 40, running, true, at::kBFloat16);
  }

  test_bad_inputs();

  std::printf("%d/%d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}

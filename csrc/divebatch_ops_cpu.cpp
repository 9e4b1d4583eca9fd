// CPU kernels of the divebatch::* operators (see divebatch_ops.h for the formulas and shapes).
//
// Parallelism: at::parallel_for over independent work items: a few samples (several per item
// when T is small, so one batched GEMM call amortises ATen's per-call overhead), or one sample
// x tile pair / row block when the batch is too small to keep every thread busy. It is only
// parallel when this file is compiled and linked with -fopenmp. GEMMs go through at::bmm_out
// into per-thread scratch: inside a parallel region ATen's BLAS runs single-threaded, which is
// what we want, and it beats hand-written loops at every size that matters. Low-precision
// inputs are converted to float32 one work item at a time, never as a whole tensor.
#include "divebatch_ops.h"
#include "multiversion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <type_traits>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace divebatch {
namespace {

// Edge of a T x T Gram tile: 256^2 floats = 256 KiB per Gram, two of them fit in L2. Smaller
// tiles are used only when the batch alone gives too few work items for the threads.
constexpr int64_t kGhostTile = 256;
constexpr int64_t kMinGhostTile = 64;
// Rows of p per work item when instantiate_norm splits samples because B < threads.
constexpr int64_t kMinRowBlock = 64;
// Multiply-adds per work item below which the samples of a work item are batched into one
// GEMM call (ATen's per-call cost is a few microseconds), and the float budget of the
// per-thread scratch such a batched call writes into.
constexpr int64_t kItemWork = int64_t{1} << 21;
constexpr int64_t kItemScratch = int64_t{1} << 20;
// Multiply-adds of a whole call below which every sample goes into one work item: ~10 us of
// arithmetic, less than the ATen calls and the thread wake-up that more items cost.
constexpr int64_t kSmallCallWork = int64_t{1} << 17;
// Elements of work per parallel chunk below which threading costs more than it saves.
constexpr int64_t kGrainElems = 32768;

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// out[b] = sum of the per-work-item partials of sample b, added in a fixed order so the result
// does not depend on how the items were scheduled over threads.
void sum_items_per_sample(const std::vector<double>& items, int64_t items_per_sample, at::Tensor& out) {
  float* po = out.data_ptr<float>();
  for (int64_t b = 0; b < out.size(0); ++b) {
    double sum = 0.0;
    for (int64_t k = 0; k < items_per_sample; ++k) {
      sum += items[b * items_per_sample + k];
    }
    po[b] = static_cast<float>(sum);
  }
}

// ------------------------------------------------------------------ input checks
// Every message starts with the operator and names the offending argument.

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "divebatch::", op, ": ", name,
              " must be a CPU tensor for the CPU kernel, got device ", t.device());
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "divebatch::", op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "divebatch::", op,
              ": ", name, " must be a floating-point tensor (float32, float16, bfloat16 or float64), got dtype ", st);
}

void check_dim(const at::Tensor& t, int64_t ndim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == ndim, "divebatch::", op, ": ", name, " must be ", ndim, "-D ", layout, ", got ", t.dim(),
              "-D shape ", t.sizes());
}

void check_size_match(const at::Tensor& ref, const at::Tensor& t, int64_t dim, const char* op, const char* ref_name,
                      const char* name, const char* what) {
  TORCH_CHECK(t.size(dim) == ref.size(dim), "divebatch::", op, ": ", name, " must have the same ", what, " (dim ",
              dim, ") as ", ref_name, ", got ", name, ".size(", dim, ") = ", t.size(dim), " and ", ref_name,
              ".size(", dim, ") = ", ref.size(dim));
}

// The checks shared by the ops taking a layer input a and an output gradient g.
void check_a_g(const at::Tensor& a, const at::Tensor& g, int64_t ndim, const char* op) {
  const char* a_layout = ndim == 3 ? "[B, T, d]" : "[B, d]";
  const char* g_layout = ndim == 3 ? "[B, T, p]" : "[B, p]";
  check_cpu(a, op, "a");
  check_same_device(a, g, op, "a", "g");
  check_float(a, op, "a");
  check_float(g, op, "g");
  check_dim(a, ndim, op, "a", a_layout);
  check_dim(g, ndim, op, "g", g_layout);
  check_size_match(a, g, 0, op, "a", "g", "batch size B");
  if (ndim == 3) {
    check_size_match(a, g, 1, op, "a", "g", "number of positions T");
  }
}

// The checks shared by the norm ops: x and g floating-point CPU tensors of one 3-D shape.
void check_norm_x_g(const at::Tensor& x, const at::Tensor& g, const char* op, const char* layout, const char* dim1,
                    const char* dim2) {
  check_cpu(x, op, "x");
  check_same_device(x, g, op, "x", "g");
  check_float(x, op, "x");
  check_float(g, op, "g");
  check_dim(x, 3, op, "x", layout);
  check_dim(g, 3, op, "g", layout);
  const char* names[3] = {"batch size B", dim1, dim2};
  for (int64_t dim = 0; dim < 3; ++dim) {
    check_size_match(x, g, dim, op, "x", "g", names[dim]);
  }
}

// ------------------------------------------------------------------ small loops

// The loops that stream whole rows or GEMM outputs are DIVEBATCH_MULTIVERSION (multiversion.h).

// `omp simd reduction` lets the compiler reorder the float sums into vector lanes (it will not
// otherwise without -ffast-math); the sums stay float32 but become lane-wise, i.e. more accurate.

inline float dot_f32(const float* x, const float* y, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) {
    s += x[k] * y[k];
  }
  return s;
}

// ||x||^2 of a contiguous float32 row. One vector accumulator would make this a chain of
// dependent adds (one vector per add latency); 32 lanes give the compiler 2-4 independent
// chains, so rows stream at memory speed. Lanes are summed at the end (float32, lane-wise).
DIVEBATCH_MULTIVERSION
float sum_sq_f32(const float* x, int64_t n) {
  constexpr int64_t kLanes = 32;
  if (n < kLanes) {  // short rows (an EmbeddingBag's per-entry scales, p = 1): no lanes to set up and add
    float s = 0.f;
    for (int64_t k = 0; k < n; ++k) {
      s += x[k] * x[k];
    }
    return s;
  }
  float lanes[kLanes] = {0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      lanes[j] += x[k + j] * x[k + j];
    }
  }
  float s = 0.f;
  for (; k < n; ++k) {
    s += x[k] * x[k];
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    s += lanes[j];
  }
  return s;
}

template <typename scalar_t>
float sum_sq(const scalar_t* x, int64_t n, int64_t stride) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 1) {
      return sum_sq_f32(x, n);
    }
  }
  float s = 0.f;
  if (stride == 1) {
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) {
      const float v = static_cast<float>(x[k]);
      s += v * v;
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const float v = static_cast<float>(x[k * stride]);
      s += v * v;
    }
  }
  return s;
}

template <typename scalar_t>
void add_row(float* acc, const scalar_t* x, int64_t n, int64_t stride) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      acc[k] += static_cast<float>(x[k]);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      acc[k] += static_cast<float>(x[k * stride]);
    }
  }
}


// <X, Y> for two contiguous float32 [rows, cols] matrices: float32 row sums, rows summed in
// double so the total over a 256 x 256 tile keeps the precision of a single row's sum.
DIVEBATCH_MULTIVERSION
double frobenius_dot(const float* x, const float* y, int64_t rows, int64_t cols) {
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    const float* yr = y + r * cols;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < cols; ++c) {
      s += xr[c] * yr[c];
    }
    total += s;
  }
  return total;
}

// ||M||^2 of a contiguous float32 [rows, cols] block, while adding it into acc (row stride
// cols): one pass over each per-sample gradient for both its norm and the batch sum.
DIVEBATCH_MULTIVERSION
double accumulate_sq(const float* m, float* acc, int64_t rows, int64_t cols) {
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* mr = m + r * cols;
    float* ar = acc + r * cols;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < cols; ++c) {
      s += mr[c] * mr[c];
      ar[c] += mr[c];
    }
    total += s;
  }
  return total;
}

at::Tensor as_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// t.narrow(dim, start, length), or t itself where that is all of it (an ATen call saved: a small
// layer's whole call costs a few dozen of them).
at::Tensor narrowed(const at::Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == t.size(dim) ? t : t.narrow(dim, start, length);
}

// A contiguous view of the given shape on the front of a per-thread scratch buffer, so
// at::bmm_out writes into it without allocating.
at::Tensor scratch_view(const at::Tensor& buffer, at::IntArrayRef sizes) {
  return buffer.narrow(0, 0, c10::multiply_integers(sizes)).view(sizes);
}

// Samples per work item: enough that one batched GEMM call amortises ATen's per-call overhead
// (small T), few enough that every thread still gets several items, and a bounded scratch.
int64_t samples_per_item(int64_t B, int64_t threads, int64_t work_per_sample, int64_t scratch_per_sample) {
  int64_t n = kItemWork / std::max<int64_t>(1, work_per_sample);
  if (B * work_per_sample > kSmallCallWork) {  // (else one item: see kSmallCallWork)
    n = std::min(n, ceil_div(B, 4 * threads));
  }
  n = std::min(n, kItemScratch / std::max<int64_t>(1, scratch_per_sample));
  return std::max<int64_t>(1, n);
}

// ||sum_t g_b[t]||^2 for g [B, T, p], any strides and floating dtype.
at::Tensor bias_sq_cpu(const at::Tensor& g) {
  const int64_t B = g.size(0), T = g.size(1), p = g.size(2);
  auto out = at::zeros({B}, g.options().dtype(at::kFloat));
  if (B == 0 || T == 0 || p == 0) {
    return out;
  }
  float* po = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "divebatch_bias_sq", [&] {
    const scalar_t* base = g.const_data_ptr<scalar_t>();
    const int64_t sb = g.stride(0), st = g.stride(1), sp = g.stride(2);
    at::parallel_for(0, B, grain_for(T * p), [&](int64_t b0, int64_t b1) {
      std::vector<float> acc(p);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < T; ++t) {
          add_row(acc.data(), base + b * sb + t * st, p, sp);
        }
        po[b] = dot_f32(acc.data(), acc.data(), p);
      }
    });
  });
  return out;
}

// ||x_b||^2 for x [B, n], any strides and floating dtype.
at::Tensor row_sq_cpu(const at::Tensor& x) {
  const int64_t B = x.size(0), n = x.size(1);
  auto out = at::zeros({B}, x.options().dtype(at::kFloat));
  if (B == 0 || n == 0) {
    return out;
  }
  float* po = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "divebatch_row_sq", [&] {
    const scalar_t* base = x.const_data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), sn = x.stride(1);
    at::parallel_for(0, B, grain_for(n), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        po[b] = sum_sq(base + b * sb, n, sn);
      }
    });
  });
  return out;
}

// Rows [i0, i0 + ti) x columns [j0, j0 + tj) of a T x T Gram.
struct TilePair {
  int64_t i0, ti, j0, tj;
};

at::Tensor zeros_b(const at::Tensor& like, int64_t B) { return at::zeros({B}, like.options().dtype(at::kFloat)); }

// One row of a LayerNorm / RMSNorm input, float32 `row[d]`, normalised in place: the mean (not for
// RMSNorm) and the mean square of what is left are taken in double, as two passes, so a row whose
// mean is large against its spread keeps its precision.
DIVEBATCH_MULTIVERSION
void normalise_row(float* row, int64_t d, bool rms, double eps) {
  double mean = 0.0;
  if (!rms) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < d; ++k) {
      s += row[k];
    }
    mean = s / static_cast<double>(d);
  }
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < d; ++k) {
    const double c = row[k] - mean;
    ss += c * c;
  }
  const float m = static_cast<float>(mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    row[k] = (row[k] - m) * rstd;
  }
}

// acc_w += x_hat * g and (with_bias) acc_b += g over one row; double accumulators, so a sum over
// thousands of rows keeps float32 precision whatever the order.
DIVEBATCH_MULTIVERSION
void accumulate_norm_row(double* acc_w, double* acc_b, const float* x_hat, const float* g, int64_t d,
                         bool with_bias) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    acc_w[k] += static_cast<double>(x_hat[k] * g[k]);
  }
  if (with_bias) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      acc_b[k] += static_cast<double>(g[k]);
    }
  }
}

// Row sums for group_norm_grads: float32 SIMD lanes over chunks of kSumChunk elements (so no lane
// adds more than a few dozen terms), the chunks' sums added in double.
constexpr int64_t kSumChunk = 1024;

DIVEBATCH_MULTIVERSION
double chunked_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = k0; k < k1; ++k) {
      s += x[k];
    }
    total += s;
  }
  return total;
}

// sum_k (x[k] - shift)^2, and sum_k (x[k] - shift) into *dev_sum: with shift a first estimate of
// the mean, dev_sum / n corrects it (the corrected two-pass algorithm: the float32 lane sums that
// gave the estimate lose digits when the mean is far from zero against the spread).
DIVEBATCH_MULTIVERSION
double chunked_sq_dev(const float* x, int64_t n, float shift, double* dev_sum) {
  double total = 0.0, dev_total = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    float s = 0.f, d = 0.f;
#pragma omp simd reduction(+ : s, d)
    for (int64_t k = k0; k < k1; ++k) {
      const float c = x[k] - shift;
      s += c * c;
      d += c;
    }
    total += s;
    dev_total += d;
  }
  *dev_sum = dev_total;
  return total;
}

// sum_k (x[k] - shift) * g[k]
DIVEBATCH_MULTIVERSION
double chunked_dot_dev(const float* x, const float* g, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kSumChunk) {
    const int64_t k1 = std::min(n, k0 + kSumChunk);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = k0; k < k1; ++k) {
      s += (x[k] - shift) * g[k];
    }
    total += s;
  }
  return total;
}

template <typename scalar_t>
void load_row_f32(float* out, const scalar_t* x, int64_t n, int64_t stride) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      out[k] = static_cast<float>(x[k]);
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<float>(x[k * stride]);
  }
}

// The row as float32: in place where it already is contiguous float32, else converted into buf.
template <typename scalar_t>
const float* row_as_f32(const scalar_t* x, int64_t n, int64_t stride, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 1) {
      return x;
    }
  }
  buf.resize(n);
  load_row_f32(buf.data(), x, n, stride);
  return buf.data();
}

}  // namespace

// ------------------------------------------------------------------ ghost_norm

std::tuple<at::Tensor, at::Tensor> ghost_norm_cpu(const at::Tensor& a_in, const at::Tensor& g_in, bool with_bias) {
  check_a_g(a_in, g_in, 3, "ghost_norm");
  // Detached views: worker threads do not inherit the dispatcher's below-autograd state, and
  // the tile GEMMs must not record a graph if the caller's tensors require grad.
  const at::Tensor a = a_in.detach(), g = g_in.detach();
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  auto weight_sq = zeros_b(a, B);
  auto bias_sq = with_bias ? bias_sq_cpu(g) : zeros_b(a, B);
  if (B == 0 || T == 0) {
    return {weight_sq, bias_sq};
  }

  // Tile pairs (i <= j) of the T x T Grams, largest first so the dynamic schedule below ends
  // on small items. Shrink the tile while one pair would exceed a thread's share of the work
  // (small batches): smaller GEMMs run slower, but idle threads cost more.
  const int64_t threads = at::get_num_threads();
  auto make_pairs = [T](int64_t tile) {
    std::vector<TilePair> pairs;
    for (int64_t i0 = 0; i0 < T; i0 += tile) {
      for (int64_t j0 = i0; j0 < T; j0 += tile) {
        pairs.push_back({i0, std::min(tile, T - i0), j0, std::min(tile, T - j0)});
      }
    }
    std::stable_sort(pairs.begin(), pairs.end(),
                     [](const TilePair& x, const TilePair& y) { return x.ti * x.tj > y.ti * y.tj; });
    return pairs;
  };
  int64_t tile = kGhostTile;
  std::vector<TilePair> pairs = make_pairs(tile);
  auto pair_area = [](const std::vector<TilePair>& ps) {
    int64_t area = 0;
    for (const auto& q : ps) {
      area += q.ti * q.tj;
    }
    return area;
  };
  while (tile > kMinGhostTile && T > tile / 2 && pairs[0].ti * pairs[0].tj * threads > B * pair_area(pairs)) {
    tile /= 2;
    pairs = make_pairs(tile);
  }
  const int64_t npairs = static_cast<int64_t>(pairs.size());
  const int64_t edge = std::min(tile, T);
  const int64_t chunk = samples_per_item(B, threads, edge * edge * (d + p), edge * edge);
  const int64_t nchunks = ceil_div(B, chunk);
  const int64_t nitems = nchunks * npairs;
  // One slot per (sample, tile pair), reduced in a fixed order: deterministic whatever thread
  // computes which item, so items can be handed out dynamically (pairs differ in size).
  std::vector<double> item_sum(B * npairs, 0.0);
  std::atomic<int64_t> next_item{0};

  at::parallel_for(0, std::min(threads, nitems), 1, [&](int64_t, int64_t) {
    const auto f32 = a.options().dtype(at::kFloat);
    const at::Tensor gram_a_buf = at::empty({chunk * edge * edge}, f32);
    const at::Tensor gram_g_buf = at::empty({chunk * edge * edge}, f32);
    for (int64_t item = next_item++; item < nitems; item = next_item++) {
      // pair-major: all chunks of the largest pair first
      const int64_t pair = item / nchunks;
      const int64_t b0 = (item % nchunks) * chunk, nb = std::min(chunk, B - b0);
      const TilePair& q = pairs[pair];
      const bool diagonal = q.i0 == q.j0;
      const at::Tensor ab = narrowed(a, 0, b0, nb), gb = narrowed(g, 0, b0, nb);
      const at::Tensor ai = as_f32(narrowed(ab, 1, q.i0, q.ti)), gi = as_f32(narrowed(gb, 1, q.i0, q.ti));
      const at::Tensor aj = diagonal ? ai : as_f32(narrowed(ab, 1, q.j0, q.tj));
      const at::Tensor gj = diagonal ? gi : as_f32(narrowed(gb, 1, q.j0, q.tj));
      at::Tensor gram_a = scratch_view(gram_a_buf, {nb, q.ti, q.tj});
      at::Tensor gram_g = scratch_view(gram_g_buf, {nb, q.ti, q.tj});
      at::bmm_out(gram_a, ai, aj.transpose(1, 2));
      at::bmm_out(gram_g, gi, gj.transpose(1, 2));
      const float* pa = gram_a.const_data_ptr<float>();
      const float* pg = gram_g.const_data_ptr<float>();
      const int64_t area = q.ti * q.tj;
      for (int64_t s = 0; s < nb; ++s) {
        // An off-diagonal pair stands for itself and its transpose.
        item_sum[(b0 + s) * npairs + pair] =
            (diagonal ? 1.0 : 2.0) * frobenius_dot(pa + s * area, pg + s * area, q.ti, q.tj);
      }
    }
  });

  sum_items_per_sample(item_sum, npairs, weight_sq);
  return {weight_sq, bias_sq};
}

// ------------------------------------------------------------------ instantiate_norm

std::tuple<at::Tensor, at::Tensor, at::Tensor> instantiate_norm_cpu(const at::Tensor& a_in, const at::Tensor& g_in,
                                                                    bool with_bias) {
  check_a_g(a_in, g_in, 3, "instantiate_norm");
  const at::Tensor a = a_in.detach(), g = g_in.detach();  // see ghost_norm_cpu
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  const auto f32 = a.options().dtype(at::kFloat);
  auto weight_sq = zeros_b(a, B);
  auto bias_sq = with_bias ? bias_sq_cpu(g) : zeros_b(a, B);
  auto grad_sum = at::zeros({p, d}, f32);
  if (B == 0 || p == 0 || d == 0) {
    return {weight_sq, bias_sq, grad_sum};
  }

  // Split each sample's p rows into blocks only when the batch alone leaves threads idle.
  const int64_t threads = at::get_num_threads();
  int64_t nblocks = 1;
  if (B < 2 * threads) {
    nblocks = std::max<int64_t>(1, std::min(ceil_div(2 * threads, B), p / kMinRowBlock));
  }
  const int64_t rows_per_block = ceil_div(p, nblocks);
  nblocks = ceil_div(p, rows_per_block);
  const int64_t chunk = nblocks > 1 ? 1 : samples_per_item(B, threads, T * p * d, p * d);
  const int64_t nitems = ceil_div(B, chunk) * nblocks;
  std::vector<double> sample_block_sq(B * nblocks, 0.0);
  // Per-thread partial sums of g_b^T a_b; thread 0 accumulates straight into the output. Each
  // thread gets one static chunk of items, so the summation order is fixed for a thread count.
  std::vector<at::Tensor> partial(std::max<int64_t>(threads, 1));
  partial[0] = grad_sum;

  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    if (!partial[tid].defined()) {
      partial[tid] = at::zeros({p, d}, f32);
    }
    float* acc = partial[tid].data_ptr<float>();
    const at::Tensor m_buf = at::empty({chunk * rows_per_block * d}, f32);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b0 = (item / nblocks) * chunk, nb = std::min(chunk, B - b0);
      const int64_t block = item % nblocks, r0 = block * rows_per_block;
      const int64_t rows = std::min(rows_per_block, p - r0);
      const at::Tensor ab = as_f32(narrowed(a, 0, b0, nb));
      const at::Tensor gb = as_f32(narrowed(narrowed(g, 0, b0, nb), 2, r0, rows));
      at::Tensor m = scratch_view(m_buf, {nb, rows, d});
      at::bmm_out(m, gb.transpose(1, 2), ab);
      const float* pm = m.const_data_ptr<float>();
      for (int64_t s = 0; s < nb; ++s) {
        const double sq = accumulate_sq(pm + s * rows * d, acc + r0 * d, rows, d);
        sample_block_sq[(b0 + s) * nblocks + block] = sq;
      }
    }
  });

  for (size_t t = 1; t < partial.size(); ++t) {
    if (partial[t].defined()) {
      grad_sum.add_(partial[t]);
    }
  }
  sum_items_per_sample(sample_block_sq, nblocks, weight_sq);
  return {weight_sq, bias_sq, grad_sum};
}

// ------------------------------------------------------------------ conv_instantiate_norm, conv_ghost_norm

namespace {

// The bound on a temporary buffer in bytes: DIVEBATCH_MAX_EXTRA_MB (MiB, default 8), read once, as
// divebatch.layers.routes reads it at import (which also refuses a malformed value, naming it).
int64_t max_extra_bytes() {
  static const int64_t bytes = [] {
    const char* text = std::getenv("DIVEBATCH_MAX_EXTRA_MB");
    char* end = nullptr;
    const double mib = text != nullptr && *text != '\0' ? std::strtod(text, &end) : 8.0;
    const bool valid = text == nullptr || *text == '\0' || (end != text && *end == '\0' && mib >= 0 && std::isfinite(mib));
    return static_cast<int64_t>((valid ? mib : 8.0) * 1048576.0);
  }();
  return bytes;
}

// The zero-padded patches of samples [start, start + count) of a one-group convolution of
// x [B, C, *in] as a [count, T, C * prod(kernel)] view (a transposed positions-last buffer, as
// divebatch.reference.conv_patches writes it: the one copy), and g [B, O, *out]'s same samples as
// [count, T, O]; checks the geometry against g, naming `op` in errors. On CPU the convolution
// operators unfold, a bounded chunk of samples at a time (the Triton kernels read the patches from
// x in place).
std::pair<at::Tensor, at::Tensor> conv_patches_cpu(const at::Tensor& x_in, const at::Tensor& g_in,
                                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation, const char* op,
                                                   int64_t start, int64_t count) {
  check_cpu(x_in, op, "x");
  check_same_device(x_in, g_in, op, "x", "g");
  check_float(x_in, op, "x");
  check_float(g_in, op, "g");
  const int64_t n = x_in.dim() - 2;
  TORCH_CHECK(n >= 1 && n <= 3 && g_in.dim() == x_in.dim(), "divebatch::", op,
              ": x must be [B, C, *spatial] with 1-3 spatial dims and g [B, O, *out] of as many dims, got x of ",
              x_in.dim(), " dims and g of ", g_in.dim());
  const std::pair<const char*, at::IntArrayRef> geometry[] = {
      {"kernel_size", kernel_size}, {"stride", stride}, {"padding", padding}, {"dilation", dilation}};
  for (const auto& [name, values] : geometry) {
    TORCH_CHECK(static_cast<int64_t>(values.size()) == n, "divebatch::", op, ": ", name,
                " needs one entry per spatial dim (", n, "), got ", values);
    const int64_t lowest = std::string(name) == "padding" ? 0 : 1;
    for (const int64_t v : values) {
      TORCH_CHECK(v >= lowest, "divebatch::", op, ": ", name, " entries must be >= ", lowest, ", got ", values);
    }
  }
  check_size_match(x_in, g_in, 0, op, "x", "g", "batch size B");
  // (see ghost_norm_cpu for the detach)
  const at::Tensor x = narrowed(x_in.detach(), 0, start, count), g = narrowed(g_in.detach(), 0, start, count);
  std::vector<int64_t> pads;  // constant_pad_nd's order: last dim first, (left, right) each
  for (int64_t i = n - 1; i >= 0; --i) {
    pads.insert(pads.end(), {padding[i], padding[i]});
  }
  at::Tensor patches = at::constant_pad_nd(x, pads, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t out = (x.size(2 + i) + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) / stride[i] + 1;
    TORCH_CHECK(out >= 1 && g.size(2 + i) == out, "divebatch::", op, ": g must have ", out,
                " output positions in spatial dim ", i, " for x of shape ", x.sizes(), " and this geometry, got g of shape ",
                g.sizes());
    // A dilated window is a contiguous window of span dil*(k-1)+1 read every dil-th element.
    patches = patches.unfold(2 + i, dilation[i] * (kernel_size[i] - 1) + 1, stride[i]);
    if (dilation[i] > 1) {
      patches = patches.slice(-1, 0, c10::nullopt, dilation[i]);
    }
  }
  // [B, C, o_1..o_n, k_1..k_n] -> [B, C, k_1..k_n, o_1..o_n]: positions last, columns in weight order.
  std::vector<int64_t> order = {0, 1};
  for (int64_t i = 0; i < n; ++i) order.push_back(2 + n + i);
  for (int64_t i = 0; i < n; ++i) order.push_back(2 + i);
  const int64_t O = g.size(1);
  int64_t T = 1, columns = x.size(1);
  for (int64_t i = 0; i < n; ++i) {
    T *= g.size(2 + i);
    columns *= kernel_size[i];
  }
  return {patches.permute(order).reshape({count, columns, T}).transpose(1, 2), g.reshape({count, O, T}).transpose(1, 2)};
}

// Calls norms(a, rows, start, count) on the unfolded patches of consecutive chunks of samples, each
// chunk's patches within max_extra_bytes() (at least one sample a chunk; one call for an empty batch).
template <typename Norms>
void for_patch_chunks(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, const char* op, Norms norms) {
  // (an empty chunk first: it checks every argument before any size is read here, and gives T and
  //  the columns of a sample's patches)
  const auto [no_patches, no_rows] = conv_patches_cpu(x, g, kernel_size, stride, padding, dilation, op, 0, 0);
  const int64_t B = x.size(0);
  if (B == 0) {
    norms(no_patches, no_rows, 0, 0);
    return;
  }
  const int64_t sample_bytes = no_patches.size(1) * no_patches.size(2) * x.element_size();
  const int64_t step = std::clamp<int64_t>(max_extra_bytes() / std::max<int64_t>(1, sample_bytes), 1, B);
  for (int64_t start = 0; start < B; start += step) {
    const int64_t count = std::min(step, B - start);
    const auto [a, rows] = conv_patches_cpu(x, g, kernel_size, stride, padding, dilation, op, start, count);
    norms(a, rows, start, count);
  }
}

}  // namespace

// instantiate_norm of a one-group convolution's zero-padded patches: (weight_sq [B], weight grad sum).
std::tuple<at::Tensor, at::Tensor> conv_instantiate_norm_cpu(const at::Tensor& x, const at::Tensor& g,
                                                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  at::Tensor weight_sq, grad_sum;
  for_patch_chunks(x, g, kernel_size, stride, padding, dilation, "conv_instantiate_norm",
                   [&](const at::Tensor& a, const at::Tensor& rows, int64_t start, int64_t count) {
                     auto [sq, bias_sq, part] = instantiate_norm_cpu(a, rows, false);
                     if (!weight_sq.defined()) {
                       weight_sq = at::empty({x.size(0)}, sq.options());
                       grad_sum = part;
                     } else {
                       grad_sum.add_(part);
                     }
                     weight_sq.narrow(0, start, count).copy_(sq);
                   });
  return {weight_sq, grad_sum};
}

// ghost_norm of a one-group convolution's zero-padded patches: weight_sq [B].
at::Tensor conv_ghost_norm_cpu(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  at::Tensor weight_sq;
  for_patch_chunks(x, g, kernel_size, stride, padding, dilation, "conv_ghost_norm",
                   [&](const at::Tensor& a, const at::Tensor& rows, int64_t start, int64_t count) {
                     const at::Tensor sq = std::get<0>(ghost_norm_cpu(a, rows, false));
                     if (!weight_sq.defined()) {
                       weight_sq = at::empty({x.size(0)}, sq.options());
                     }
                     weight_sq.narrow(0, start, count).copy_(sq);
                   });
  return weight_sq;
}

// ------------------------------------------------------------------ outer_norm

std::tuple<at::Tensor, at::Tensor> outer_norm_cpu(const at::Tensor& a, const at::Tensor& g, bool with_bias) {
  check_a_g(a, g, 2, "outer_norm");
  at::Tensor g_sq = row_sq_cpu(g);
  at::Tensor weight_sq = row_sq_cpu(a).mul_(g_sq);
  if (!with_bias) {
    g_sq.zero_();
  }
  return {weight_sq, g_sq};
}

// ------------------------------------------------------------------ embedding_norm

at::Tensor embedding_norm_cpu(const at::Tensor& indices_in, const at::Tensor& g, int64_t padding_idx) {
  constexpr const char* op = "embedding_norm";
  check_cpu(indices_in, op, "indices");
  check_same_device(indices_in, g, op, "indices", "g");
  TORCH_CHECK(indices_in.scalar_type() == at::kLong || indices_in.scalar_type() == at::kInt, "divebatch::", op,
              ": indices must be an integer tensor (int64 or int32), got dtype ", indices_in.scalar_type());
  check_float(g, op, "g");
  check_dim(indices_in, 2, op, "indices", "[B, T]");
  check_dim(g, 3, op, "g", "[B, T, p]");
  check_size_match(indices_in, g, 0, op, "indices", "g", "batch size B");
  check_size_match(indices_in, g, 1, op, "indices", "g", "number of positions T");

  const at::Tensor indices = indices_in.to(at::kLong);  // one index type to instantiate for
  const int64_t B = g.size(0), T = g.size(1), p = g.size(2);
  auto out = zeros_b(g, B);
  if (B == 0 || T == 0 || p == 0) {
    return out;
  }
  float* po = out.data_ptr<float>();
  const int64_t* pidx = indices.const_data_ptr<int64_t>();
  const int64_t si_b = indices.stride(0), si_t = indices.stride(1);
  const bool has_padding = padding_idx >= 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "divebatch_embedding_norm", [&] {
    const scalar_t* base = g.const_data_ptr<scalar_t>();
    const int64_t sb = g.stride(0), st = g.stride(1), sp = g.stride(2);
    at::parallel_for(0, B, grain_for(T * p), [&](int64_t b0, int64_t b1) {
      std::vector<std::pair<int64_t, int64_t>> keyed;  // (index, position)
      keyed.reserve(T);
      std::vector<float> acc(p);
      for (int64_t b = b0; b < b1; ++b) {
        keyed.clear();
        for (int64_t t = 0; t < T; ++t) {
          const int64_t u = pidx[b * si_b + t * si_t];
          if (!has_padding || u != padding_idx) {
            keyed.emplace_back(u, t);
          }
        }
        // Sorting (index, position) groups equal indices and fixes the summation order.
        std::sort(keyed.begin(), keyed.end());
        double total = 0.0;
        const int64_t n = static_cast<int64_t>(keyed.size());
        for (int64_t s = 0; s < n;) {
          int64_t e = s + 1;
          while (e < n && keyed[e].first == keyed[s].first) {
            ++e;
          }
          if (e == s + 1) {  // an index seen once: its row is the gradient row itself
            total += sum_sq(base + b * sb + keyed[s].second * st, p, sp);
          } else {
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t k = s; k < e; ++k) {
              add_row(acc.data(), base + b * sb + keyed[k].second * st, p, sp);
            }
            total += dot_f32(acc.data(), acc.data(), p);
          }
          s = e;
        }
        po[b] = static_cast<float>(total);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------ affine_norm_grads

std::tuple<at::Tensor, at::Tensor> affine_norm_grads_cpu(const at::Tensor& x, const at::Tensor& g, bool rms, double eps,
                                                         bool with_bias, bool round_x_hat) {
  check_norm_x_g(x, g, "affine_norm_grads", "[B, R, d]", "rows R", "width d");
  const int64_t B = x.size(0), R = x.size(1), d = x.size(2);
  auto weight = at::zeros({B, d}, x.options().dtype(at::kFloat));
  auto bias = at::zeros({B, d}, x.options().dtype(at::kFloat));
  if (B == 0 || R == 0 || d == 0) {
    return {weight, bias};
  }
  // Work items: (sample, block of rows); blocks only when the batch alone leaves threads idle.
  // Each item sums into its own double partials, added per sample in a fixed order afterwards,
  // so the result does not depend on the thread count.
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = B >= threads ? 1 : std::min<int64_t>(R, ceil_div(threads, B));
  const int64_t rows_per_block = ceil_div(R, blocks);
  std::vector<double> partial_w(static_cast<size_t>(B * blocks * d), 0.0);
  std::vector<double> partial_b(with_bias ? static_cast<size_t>(B * blocks * d) : 0, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "divebatch_affine_norm_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "divebatch_affine_norm_g", [&] {
      const x_t* px = x.const_data_ptr<x_t>();
      const scalar_t* pg = g.const_data_ptr<scalar_t>();
      at::parallel_for(0, B * blocks, grain_for(rows_per_block * d), [&](int64_t i0, int64_t i1) {
        std::vector<float> row(d), grow(d);
        for (int64_t item = i0; item < i1; ++item) {
          const int64_t b = item / blocks, first = (item % blocks) * rows_per_block;
          const int64_t last = std::min(R, first + rows_per_block);
          double* acc_w = partial_w.data() + item * d;
          double* acc_b = with_bias ? partial_b.data() + item * d : nullptr;
          for (int64_t r = first; r < last; ++r) {
            load_row_f32(row.data(), px + b * x.stride(0) + r * x.stride(1), d, x.stride(2));
            load_row_f32(grow.data(), pg + b * g.stride(0) + r * g.stride(1), d, g.stride(2));
            normalise_row(row.data(), d, rms, eps);
            if (round_x_hat && !std::is_same_v<x_t, float>) {  // Llama RMSNorm: x_hat in the input dtype
              for (int64_t k = 0; k < d; ++k) {
                row[k] = static_cast<float>(static_cast<x_t>(row[k]));
              }
            }
            accumulate_norm_row(acc_w, acc_b, row.data(), grow.data(), d, with_bias);
          }
        }
      });
    });
  });
  float* pw = weight.data_ptr<float>();
  float* pb = bias.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < d; ++k) {
      double sw = 0.0, sb = 0.0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        sw += partial_w[(b * blocks + blk) * d + k];
        if (with_bias) {
          sb += partial_b[(b * blocks + blk) * d + k];
        }
      }
      pw[b * d + k] = static_cast<float>(sw);
      pb[b * d + k] = static_cast<float>(sb);
    }
  }
  return {weight, bias};
}

// ------------------------------------------------------------------ channels-last sums
// (group_norm_grads, channel_norm_grads)

// For channels-last inputs (channels contiguous): one position's C values added into per-channel
// float lanes, so the loops run along memory instead of striding by C per (sample, channel) row.
DIVEBATCH_MULTIVERSION
void add_lanes(float* acc, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += x[c];
  }
}

DIVEBATCH_MULTIVERSION
void add_sq_dev_lanes(float* acc, float* acc_dev, const float* x, const float* centre, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float v = x[c] - centre[c];
    acc[c] += v * v;
    acc_dev[c] += v;
  }
}

DIVEBATCH_MULTIVERSION
void add_dot_dev_lanes(float* acc, const float* x, const float* g, const float* centre, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += (x[c] - centre[c]) * g[c];
  }
}

// Positions per float32 partial sum in the channels-last loops (each channel's lane adds one term
// per position, so fewer than the row loops' kSumChunk, whose terms spread over SIMD lanes).
constexpr int64_t kPositionChunk = 128;

// out[c] += acc[c], then acc[c] = 0: a chunk's float32 partial sums moved into the double totals.
DIVEBATCH_MULTIVERSION
void flush_lanes(double* out, float* acc, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    out[c] += static_cast<double>(acc[c]);
    acc[c] = 0.f;
  }
}

enum class ChannelPass { kSum, kSqDev, kDotDev };

// Scratch for sample_channel_sums: float32 lanes (zero between calls) and conversion buffers.
struct ChannelLanes {
  explicit ChannelLanes(int64_t C) : acc(C, 0.f), acc_g(C, 0.f) {}
  std::vector<float> acc, acc_g, xbuf, gbuf;
};

// One sample's per-channel sums over its S positions for channels-last x, g (stride 1 along C),
// added into out (and out_g): kSum: sum_s x; kSqDev: sum_s (x - centre[c])^2 (and sum_s (x - centre[c]));
// kDotDev: sum_s (x - centre[c]) g (and sum_s g). Float32 lanes over kPositionChunk positions, the
// chunks added in double.
template <ChannelPass pass, typename x_t, typename g_t>
void sample_channel_sums(const x_t* x, int64_t x_stride_s, const g_t* g, int64_t g_stride_s, int64_t S, int64_t C,
                         const float* centre, double* out, double* out_g, ChannelLanes& lanes) {
  std::vector<float>&acc = lanes.acc, &acc_g = lanes.acc_g, &xbuf = lanes.xbuf, &gbuf = lanes.gbuf;
  for (int64_t s0 = 0; s0 < S; s0 += kPositionChunk) {
    for (int64_t s = s0; s < std::min(S, s0 + kPositionChunk); ++s) {
      const float* xs = row_as_f32(x + s * x_stride_s, C, 1, xbuf);
      if constexpr (pass == ChannelPass::kSum) {
        add_lanes(acc.data(), xs, C);
      } else if constexpr (pass == ChannelPass::kSqDev) {
        add_sq_dev_lanes(acc.data(), acc_g.data(), xs, centre, C);
      } else {
        const float* gs = row_as_f32(g + s * g_stride_s, C, 1, gbuf);
        add_dot_dev_lanes(acc.data(), xs, gs, centre, C);
        add_lanes(acc_g.data(), gs, C);
      }
    }
    flush_lanes(out, acc.data(), C);
    if constexpr (pass != ChannelPass::kSum) {
      flush_lanes(out_g, acc_g.data(), C);
    }
  }
}

// ------------------------------------------------------------------ group_norm_grads

std::tuple<at::Tensor, at::Tensor> group_norm_grads_cpu(const at::Tensor& x, const at::Tensor& g, int64_t groups,
                                                        double eps, bool with_bias) {
  constexpr const char* op = "group_norm_grads";
  check_norm_x_g(x, g, op, "[B, C, S]", "channels C", "positions S");
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  TORCH_CHECK(groups >= 1 && C % groups == 0, "divebatch::", op, ": groups=", groups, " must divide the ", C,
              " channels of x");
  auto weight = at::zeros({B, C}, x.options().dtype(at::kFloat));
  auto bias = at::zeros({B, C}, x.options().dtype(at::kFloat));
  if (B == 0 || C == 0 || S == 0) {
    return {weight, bias};
  }
  const int64_t per_group = C / groups;
  float* pw = weight.data_ptr<float>();
  float* pb = bias.data_ptr<float>();
  // One work item per (sample, group): its channels' rows as float32 (read in place where the
  // group is one contiguous float32 block, else converted once), then the mean and the mean
  // squared deviation in double, then each channel's sums in double.
  // Channels-last inputs (channels contiguous, several positions) instead go one sample at a time,
  // its channels summed together in per-channel lanes (sample_channel_sums), three passes, the
  // groups' statistics from their channels' sums.
  const bool contiguous_groups = x.stride(2) == 1 && x.stride(1) == S;
  const bool channels_last = x.stride(1) == 1 && g.stride(1) == 1 && C > 1 && S > 1;
  const double count = static_cast<double>(per_group * S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "divebatch_group_norm_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "divebatch_group_norm_g", [&] {
      const x_t* px = x.const_data_ptr<x_t>();
      const scalar_t* pg = g.const_data_ptr<scalar_t>();
      if (channels_last) {
        at::parallel_for(0, B, grain_for(C * S), [&](int64_t b0, int64_t b1) {
          ChannelLanes lanes(C);
          std::vector<double> sums(C), sums_g(C), mean_dev(groups), rstd(groups);
          std::vector<float> centre(C);
          const auto group_total = [&](const std::vector<double>& v, int64_t q) {
            return std::accumulate(v.begin() + q * per_group, v.begin() + (q + 1) * per_group, 0.0);
          };
          for (int64_t b = b0; b < b1; ++b) {
            const x_t* xb = px + b * x.stride(0);
            const scalar_t* gb = pg + b * g.stride(0);
            const auto pass = [&](auto pass_tag) {
              std::fill(sums.begin(), sums.end(), 0.0);
              std::fill(sums_g.begin(), sums_g.end(), 0.0);
              sample_channel_sums<decltype(pass_tag)::value>(xb, x.stride(2), gb, g.stride(2), S, C, centre.data(),
                                                             sums.data(), sums_g.data(), lanes);
            };
            pass(std::integral_constant<ChannelPass, ChannelPass::kSum>{});
            for (int64_t q = 0; q < groups; ++q) {  // a float32 estimate of each group's mean
              std::fill_n(centre.begin() + q * per_group, per_group, static_cast<float>(group_total(sums, q) / count));
            }
            pass(std::integral_constant<ChannelPass, ChannelPass::kSqDev>{});
            for (int64_t q = 0; q < groups; ++q) {  // what the estimate lacks, and the variance
              mean_dev[q] = group_total(sums_g, q) / count;
              rstd[q] = 1.0 / std::sqrt(group_total(sums, q) / count - mean_dev[q] * mean_dev[q] + eps);
            }
            pass(std::integral_constant<ChannelPass, ChannelPass::kDotDev>{});
            for (int64_t c = 0; c < C; ++c) {
              const int64_t q = c / per_group;
              pw[b * C + c] = static_cast<float>((sums[c] - mean_dev[q] * sums_g[c]) * rstd[q]);
              pb[b * C + c] = with_bias ? static_cast<float>(sums_g[c]) : 0.f;
            }
          }
        });
        return;
      }
      at::parallel_for(0, B * groups, grain_for(per_group * S), [&](int64_t i0, int64_t i1) {
        std::vector<float> buf, gbuf;
        for (int64_t item = i0; item < i1; ++item) {
          const int64_t b = item / groups, c0 = (item % groups) * per_group;
          const x_t* first = px + b * x.stride(0) + c0 * x.stride(1);
          const float* rows = nullptr;
          if (contiguous_groups) {
            rows = row_as_f32(first, per_group * S, 1, buf);
          } else {
            buf.resize(per_group * S);
            for (int64_t c = 0; c < per_group; ++c) {
              load_row_f32(buf.data() + c * S, first + c * x.stride(1), S, x.stride(2));
            }
            rows = buf.data();
          }
          // The rows are centred by a float32 estimate of the mean; mean_dev is what it lacks.
          const float mean = static_cast<float>(chunked_sum(rows, per_group * S) / count);
          double dev_sum = 0.0;
          const double sq_dev = chunked_sq_dev(rows, per_group * S, mean, &dev_sum);
          const double mean_dev = dev_sum / count;
          const double rstd = 1.0 / std::sqrt(sq_dev / count - mean_dev * mean_dev + eps);
          for (int64_t c = 0; c < per_group; ++c) {
            const float* grow = row_as_f32(pg + b * g.stride(0) + (c0 + c) * g.stride(1), S, g.stride(2), gbuf);
            const double g_sum = chunked_sum(grow, S);
            const double dot = chunked_dot_dev(rows + c * S, grow, S, mean) - mean_dev * g_sum;
            pw[b * C + c0 + c] = static_cast<float>(dot * rstd);
            pb[b * C + c0 + c] = with_bias ? static_cast<float>(g_sum) : 0.f;
          }
        }
      });
    });
  });
  return {weight, bias};
}

// ------------------------------------------------------------------ channel_norm_grads

std::tuple<at::Tensor, at::Tensor> channel_norm_grads_cpu(const at::Tensor& x, const at::Tensor& g,
                                                          const std::optional<at::Tensor>& mean,
                                                          const std::optional<at::Tensor>& var, double eps,
                                                          bool with_bias) {
  constexpr const char* op = "channel_norm_grads";
  check_norm_x_g(x, g, op, "[B, C, S]", "channels C", "positions S");
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  TORCH_CHECK(mean.has_value() == var.has_value(), "divebatch::", op,
              ": give both mean and var (running statistics) or neither (the batch's), got only ",
              mean.has_value() ? "mean" : "var");
  if (mean.has_value()) {
    for (const auto& [stat, name] : {std::pair{&*mean, "mean"}, std::pair{&*var, "var"}}) {
      check_same_device(x, *stat, op, "x", name);
      check_float(*stat, op, name);
      TORCH_CHECK(stat->dim() == 1 && stat->size(0) == C, "divebatch::", op, ": ", name,
                  " must be 1-D with one entry per channel of x (", C, "), got shape ", stat->sizes());
    }
  }
  auto weight = at::zeros({B, C}, x.options().dtype(at::kFloat));
  auto bias = at::zeros({B, C}, x.options().dtype(at::kFloat));
  if (B == 0 || C == 0 || S == 0) {
    return {weight, bias};
  }
  // Per channel: the mean as float (what the float32 lanes centre the rows by), what that float
  // lacks of the mean (added back as shortfall * sum_s g), and 1 / sqrt(var + eps).
  std::vector<float> centre(C);
  std::vector<double> shortfall(C, 0.0), rstd(C);
  if (mean.has_value()) {
    const at::Tensor m = mean->to(at::kDouble).contiguous(), v = var->to(at::kDouble).contiguous();
    for (int64_t c = 0; c < C; ++c) {
      centre[c] = static_cast<float>(m.const_data_ptr<double>()[c]);
      rstd[c] = 1.0 / std::sqrt(v.const_data_ptr<double>()[c] + eps);
    }
  }
  float* pw = weight.data_ptr<float>();
  float* pb = bias.data_ptr<float>();
  // Work items are (sample, channel) rows, or whole samples for channels-last inputs, each summed
  // by one thread; the batch statistics are added over samples per channel in a fixed order:
  // deterministic. Data already contiguous float32 is read in place, else converted per pass.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "divebatch_channel_norm_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "divebatch_channel_norm_g", [&] {
      const x_t* px = x.const_data_ptr<x_t>();
      const scalar_t* pg = g.const_data_ptr<scalar_t>();
      // Channels-last rows stride by C (and [B, C] inputs have rows of one value): there each
      // sample's channels are summed together instead.
      const bool channels_last = x.stride(1) == 1 && g.stride(1) == 1 && C > 1;
      std::vector<double> row_total(B * C, 0.0), row_total_g(B * C, 0.0);
      // One pass's per-(sample, channel) sums into row_total (and row_total_g; see sample_channel_sums).
      const auto run_pass = [&](auto pass_tag) {
        constexpr ChannelPass pass = decltype(pass_tag)::value;
        std::fill(row_total.begin(), row_total.end(), 0.0);
        std::fill(row_total_g.begin(), row_total_g.end(), 0.0);
        if (channels_last) {
          at::parallel_for(0, B, grain_for(S * C), [&](int64_t b0, int64_t b1) {
            ChannelLanes lanes(C);
            for (int64_t b = b0; b < b1; ++b) {
              sample_channel_sums<pass>(px + b * x.stride(0), x.stride(2), pg + b * g.stride(0), g.stride(2), S, C,
                                        centre.data(), row_total.data() + b * C, row_total_g.data() + b * C, lanes);
            }
          });
          return;
        }
        at::parallel_for(0, B * C, grain_for(S), [&](int64_t i0, int64_t i1) {
          std::vector<float> xbuf, gbuf;
          for (int64_t item = i0; item < i1; ++item) {
            const int64_t b = item / C, c = item % C;
            const float* xr = row_as_f32(px + b * x.stride(0) + c * x.stride(1), S, x.stride(2), xbuf);
            if constexpr (pass == ChannelPass::kSum) {
              row_total[item] = chunked_sum(xr, S);
            } else if constexpr (pass == ChannelPass::kSqDev) {
              row_total[item] = chunked_sq_dev(xr, S, centre[c], &row_total_g[item]);
            } else {
              const float* gr = row_as_f32(pg + b * g.stride(0) + c * g.stride(1), S, g.stride(2), gbuf);
              row_total[item] = chunked_dot_dev(xr, gr, S, centre[c]);
              row_total_g[item] = chunked_sum(gr, S);
            }
          }
        });
      };
      // Per channel, the rows' totals (of row_total and row_total_g) added over samples in a fixed order.
      std::vector<double> channel_total(C), channel_total_g(C);
      const auto total_over_samples = [&] {
        std::fill(channel_total.begin(), channel_total.end(), 0.0);
        std::fill(channel_total_g.begin(), channel_total_g.end(), 0.0);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t c = 0; c < C; ++c) {
            channel_total[c] += row_total[b * C + c];
            channel_total_g[c] += row_total_g[b * C + c];
          }
        }
      };
      if (!mean.has_value()) {
        // The batch's statistics, two passes (so no two large sums are subtracted): the rows'
        // sums give a first estimate of each channel's mean, the centre (a float, which the lanes
        // subtract); the deviations from it give the variance and what the centre lacks of the
        // mean (shortfall = centre - mean, put back as shortfall * sum_s g below).
        const double count = static_cast<double>(B) * static_cast<double>(S);
        run_pass(std::integral_constant<ChannelPass, ChannelPass::kSum>{});
        total_over_samples();
        for (int64_t c = 0; c < C; ++c) {
          centre[c] = static_cast<float>(channel_total[c] / count);
        }
        run_pass(std::integral_constant<ChannelPass, ChannelPass::kSqDev>{});
        total_over_samples();
        for (int64_t c = 0; c < C; ++c) {
          const double mean_dev = channel_total_g[c] / count;
          shortfall[c] = -mean_dev;
          rstd[c] = 1.0 / std::sqrt(channel_total[c] / count - mean_dev * mean_dev + eps);
        }
      }
      run_pass(std::integral_constant<ChannelPass, ChannelPass::kDotDev>{});
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t item = b * C + c;
          pw[item] = static_cast<float>((row_total[item] + shortfall[c] * row_total_g[item]) * rstd[c]);
        }
      }
      if (with_bias) {
        std::transform(row_total_g.begin(), row_total_g.end(), pb, [](double v) { return static_cast<float>(v); });
      }
    });
  });
  return {weight, bias};
}

}  // namespace divebatch

// The schemas live in divebatch/ops.py (torch.library); here only the CPU implementations.
TORCH_LIBRARY_IMPL(divebatch, CPU, m) {
  m.impl("ghost_norm", &divebatch::ghost_norm_cpu);
  m.impl("instantiate_norm", &divebatch::instantiate_norm_cpu);
  m.impl("conv_instantiate_norm", &divebatch::conv_instantiate_norm_cpu);
  m.impl("conv_ghost_norm", &divebatch::conv_ghost_norm_cpu);
  m.impl("outer_norm", &divebatch::outer_norm_cpu);
  m.impl("embedding_norm", &divebatch::embedding_norm_cpu);
  m.impl("affine_norm_grads", &divebatch::affine_norm_grads_cpu);
  m.impl("group_norm_grads", &divebatch::group_norm_grads_cpu);
  m.impl("channel_norm_grads", &divebatch::channel_norm_grads_cpu);
}

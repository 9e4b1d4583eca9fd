// DIVEBATCH_MULTIVERSION: compile a loop for AVX-512, AVX2 and baseline x86-64 and pick one at
// load time (GCC/Clang function multiversioning). The package is built for baseline x86-64, where
// `omp simd` alone would only get 4-wide SSE.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER)
#define DIVEBATCH_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIVEBATCH_MULTIVERSION
#endif

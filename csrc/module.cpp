// The Python module divebatch._C. The operators are not bound here: importing this module loads
// the shared library, whose TORCH_LIBRARY_IMPL block registers the CPU kernels with the
// dispatcher (torch.ops.divebatch.*). pybind11 serves only these small helpers.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/headeronly/version.h>

#include <string>

#define DIVEBATCH_STR2(x) #x
#define DIVEBATCH_STR(x) DIVEBATCH_STR2(x)

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown compiler";
#endif
}

std::string build_info() {
  std::string info = std::string("divebatch C++ extension (module ") + DIVEBATCH_STR(TORCH_EXTENSION_NAME) +
                     "): " + compiler() + ", built against torch " + TORCH_VERSION + ", ";
#ifdef _OPENMP
  info += "OpenMP " + std::to_string(_OPENMP) + " (at::parallel_for runs on " +
          std::to_string(at::get_num_threads()) + " threads)";
#else
  info += "no OpenMP (at::parallel_for is serial: rebuild with -fopenmp)";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "divebatch C++ CPU operators (registered as torch.ops.divebatch.*) and build helpers.";
  m.def("build_info", &build_info, "Compiler, torch version and OpenMP status of this build.");
  m.def("num_threads", &at::get_num_threads, "at::get_num_threads(): threads at::parallel_for may use.");
}

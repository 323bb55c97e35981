// CPU forward and backward: the kernels of policy_loss_cpu_kernels.h for the instruction set of
// this machine. The portable build (CPU_CAPABILITY=DEFAULT) is compiled here; the AVX2 build is
// policy_loss_cpu_avx2.cpp, compiled with -mavx2 -mfma where the compiler targets x86-64
// (AEPG_CPU_AVX2). ATen's own choice (at::get_cpu_capability, which honours the environment
// variable ATEN_CPU_CAPABILITY=default) decides, so the portable path can be tested too.
#define CPU_CAPABILITY DEFAULT
#include "policy_loss_cpu_kernels.h"

#include <ATen/Version.h>

#include <string>

namespace aepg::cpu {

#ifdef AEPG_CPU_AVX2
namespace AVX2 {
void forward(const KernelArgs& args);
void backward(const KernelArgs& args);
}  // namespace AVX2

static bool use_avx2() {
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return avx2;
}
#else
static bool use_avx2() { return false; }
#endif

void forward(const KernelArgs& args) {
#ifdef AEPG_CPU_AVX2
  if (use_avx2()) return AVX2::forward(args);
#endif
  DEFAULT::forward(args);
}

void backward(const KernelArgs& args) {
#ifdef AEPG_CPU_AVX2
  if (use_avx2()) return AVX2::backward(args);
#endif
  DEFAULT::backward(args);
}

const char* capability() { return use_avx2() ? "AVX2" : "DEFAULT"; }

}  // namespace aepg::cpu

// CPU forward and backward: the kernels of policy_loss_cpu_kernels.h for the instruction set of
// this machine. The portable build (CPU_CAPABILITY=DEFAULT) is compiled here; the AVX2 and AVX-512
// builds are policy_loss_cpu_avx2.cpp / _avx512.cpp, compiled with their flags where the compiler
// targets x86-64 (AEPG_CPU_AVX2, AEPG_CPU_AVX512). ATen's own choice (at::get_cpu_capability,
// which honours ATEN_CPU_CAPABILITY=default/avx2) decides, so every build can be tested here.
#define CPU_CAPABILITY DEFAULT
#include "policy_loss_cpu_kernels.h"

#include <ATen/Version.h>

#include <string>

namespace aepg::cpu {

#define AEPG_DECLARE_KERNELS(capability) \
  namespace capability {                 \
  void forward(const KernelArgs& args);  \
  void backward(const KernelArgs& args); \
  }
#ifdef AEPG_CPU_AVX2
AEPG_DECLARE_KERNELS(AVX2)
#endif
#ifdef AEPG_CPU_AVX512
AEPG_DECLARE_KERNELS(AVX512)
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };

static Isa isa() {
  static const Isa chosen = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef AEPG_CPU_AVX512
    if (capability == "AVX512") return Isa::kAvx512;
#endif
#ifdef AEPG_CPU_AVX2
    if (capability == "AVX2" || capability == "AVX512") return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return chosen;
}

void forward(const KernelArgs& args) {
  switch (isa()) {
#ifdef AEPG_CPU_AVX512
    case Isa::kAvx512:
      return AVX512::forward(args);
#endif
#ifdef AEPG_CPU_AVX2
    case Isa::kAvx2:
      return AVX2::forward(args);
#endif
    default:
      return DEFAULT::forward(args);
  }
}

void backward(const KernelArgs& args) {
  switch (isa()) {
#ifdef AEPG_CPU_AVX512
    case Isa::kAvx512:
      return AVX512::backward(args);
#endif
#ifdef AEPG_CPU_AVX2
    case Isa::kAvx2:
      return AVX2::backward(args);
#endif
    default:
      return DEFAULT::backward(args);
  }
}

const char* capability() {
  switch (isa()) {
    case Isa::kAvx512:
      return "AVX512";
    case Isa::kAvx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

}  // namespace aepg::cpu

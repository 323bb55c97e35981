// The CPU kernels for AVX2 + FMA: compiled with -mavx2 -mfma (x86-64 only) and called only when
// ATen reports AVX2 or better at run time (see policy_loss_cpu.cpp).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "policy_loss_cpu_kernels.h"

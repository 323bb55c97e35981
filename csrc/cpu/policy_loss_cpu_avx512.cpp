// The CPU kernels for AVX-512 (F, BW, VL, DQ) + FMA: compiled with those flags (x86-64 only) and
// called only when ATen reports AVX512 at run time (see policy_loss_cpu.cpp).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "policy_loss_cpu_kernels.h"

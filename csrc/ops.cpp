// The operators aepg::native_forward / native_backward / native_scale_ (CPU, CUDA and Meta
// kernels) and the Python module aepg_kernels._C. The glue here validates the tensors, allocates
// the outputs and fills KernelArgs once for both devices; the kernels only compute.
#include "kernel_args.h"
#include "policy_loss_math.h"

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace aepg {
namespace {

using at::Tensor;

c10::ScalarType accumulation_dtype(c10::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor, Tensor> forward_outputs(const Tensor& logits, bool write_grad) {
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const auto acc = logits.options().dtype(accumulation_dtype(logits.scalar_type()));
  return {at::empty({n_rows}, acc), at::empty({kNumStats, n_rows}, acc),
          write_grad ? at::empty({n_rows, n_cols}, logits.options()) : at::empty({0}, logits.options())};
}

void check_inputs(const Tensor& logits, const Tensor& target, bool prob_target) {
  TORCH_CHECK(logits.dim() == 2, "aepg: logits must be (rows, classes), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "aepg: logits need at least one class");
  TORCH_CHECK(logits.stride(1) == 1, "aepg: logits must have unit column stride");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "aepg: logits must be floating point");
  TORCH_CHECK(target.device() == logits.device(), "aepg: target must be on the logits' device");
  if (prob_target) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "aepg: probability targets must have the logits' shape");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "aepg: targets must be (rows,)");
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                "aepg: class indices must be int64 or int32");
  }
}

// Fills the arguments both directions share. `keep` holds converted tensors until the kernels
// have run (on CUDA the caching allocator orders their reuse after the launch on this stream).
KernelArgs common_args(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                       const std::optional<Tensor>& ce_weight_t, const std::optional<Tensor>& epg_weight_t,
                       double ce_weight, double epg_weight, double entropy_weight, double label_smoothing,
                       int64_t ignore_index, int64_t reduction, bool prob_target, const Tensor& denom,
                       std::vector<Tensor>& keep) {
  check_inputs(logits, target, prob_target);
  const auto acc = accumulation_dtype(logits.scalar_type());
  auto in_acc = [&](const Tensor& t) -> const void* {
    keep.push_back(t.to(logits.device(), acc).contiguous());
    return keep.back().data_ptr();
  };
  KernelArgs args;
  args.n_rows = logits.size(0);
  args.n_cols = logits.size(1);
  args.device_index = logits.is_cuda() ? logits.device().index() : -1;
  args.dtype = logits.scalar_type();
  args.fp64 = acc == at::kDouble;
  args.logits = logits.data_ptr();
  args.logits_stride = logits.stride(0);
  args.prob_target = prob_target;
  if (prob_target) {
    args.target = in_acc(target);
    args.q_stride = args.n_cols;
  } else {
    keep.push_back(target.contiguous());
    args.target = keep.back().data_ptr();
    args.target_int32 = target.scalar_type() == at::kInt;
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == args.n_cols, "aepg: weight must be (classes,)");
    args.weight = in_acc(*weight);
    if (label_smoothing > 0 || prob_target) args.w_total = in_acc(keep.back().sum());
  }
  if (ce_weight_t.has_value()) args.a_ptr = in_acc(*ce_weight_t);
  if (epg_weight_t.has_value()) args.b_ptr = in_acc(*epg_weight_t);
  args.a = ce_weight;
  args.b = epg_weight;
  args.beta = entropy_weight;
  args.eps = label_smoothing;
  args.ignore_index = ignore_index;
  args.mean = reduction == 1;  // at::Reduction::Mean
  args.denom = in_acc(denom);
  return args;
}

std::tuple<Tensor, Tensor, Tensor> native_forward(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& ce_weight_t, const std::optional<Tensor>& epg_weight_t, double ce_weight,
    double epg_weight, double entropy_weight, double label_smoothing, double focal_gamma, int64_t ignore_index,
    int64_t reduction, bool prob_target, const Tensor& denom, bool need_entropy, bool write_grad) {
  std::vector<Tensor> keep;
  KernelArgs args = common_args(logits, target, weight, ce_weight_t, epg_weight_t, ce_weight, epg_weight,
                                entropy_weight, label_smoothing, ignore_index, reduction, prob_target, denom, keep);
  auto [loss, stats, grad] = forward_outputs(logits, write_grad);
  if (args.n_rows == 0) return {loss, stats, grad};
  args.gamma = focal_gamma;
  args.focal = focal_gamma > 0;
  args.entropy = need_entropy || entropy_weight != 0;
  args.loss = loss.data_ptr();
  args.stats = stats.data_ptr();
  args.grad = write_grad ? grad.data_ptr() : nullptr;
  if (logits.is_cuda()) {
#ifdef AEPG_WITH_CUDA
    TORCH_CHECK(!write_grad || args.n_cols <= cuda::kMaxOnChipCols,
                "aepg: the fused gradient needs a row on chip, C=", args.n_cols, " is too long");
    cuda::forward(args);
#endif
  } else {
    cpu::forward(args);
  }
  return {loss, stats, grad};
}

std::tuple<Tensor, Tensor, Tensor> native_forward_meta(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& ce_weight_t, const std::optional<Tensor>& epg_weight_t, double ce_weight,
    double epg_weight, double entropy_weight, double label_smoothing, double focal_gamma, int64_t ignore_index,
    int64_t reduction, bool prob_target, const Tensor& denom, bool need_entropy, bool write_grad) {
  return forward_outputs(logits, write_grad);
}

Tensor native_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                       const std::optional<Tensor>& weight, const std::optional<Tensor>& ce_weight_t,
                       const std::optional<Tensor>& epg_weight_t, double ce_weight, double epg_weight,
                       double entropy_weight, double label_smoothing, int64_t ignore_index, int64_t reduction,
                       bool prob_target, const Tensor& stats, const Tensor& denom) {
  std::vector<Tensor> keep;
  KernelArgs args = common_args(logits, target, weight, ce_weight_t, epg_weight_t, ce_weight, epg_weight,
                                entropy_weight, label_smoothing, ignore_index, reduction, prob_target, denom, keep);
  Tensor grad = at::empty({args.n_rows, args.n_cols}, logits.options());
  if (args.n_rows == 0) return grad;
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == args.n_rows),
              "aepg: grad_loss must be 0-d or (rows,)");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kNumStats && stats.size(1) == args.n_rows,
              "aepg: stats must be (", int(kNumStats), ", rows)");
  const auto acc = accumulation_dtype(logits.scalar_type());
  keep.push_back(grad_loss.to(acc));  // keeps its stride (0-d: stride 0)
  args.grad_loss = keep.back().data_ptr();
  args.grad_loss_stride = grad_loss.dim() ? keep.back().stride(0) : 0;
  keep.push_back(stats.to(acc).contiguous());
  args.saved_stats = keep.back().data_ptr();
  args.entropy = entropy_weight != 0;
  args.grad = grad.data_ptr();
  if (logits.is_cuda()) {
#ifdef AEPG_WITH_CUDA
    cuda::backward(args);
#endif
  } else {
    cpu::backward(args);
  }
  return grad;
}

Tensor native_backward_meta(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                            const std::optional<Tensor>& weight, const std::optional<Tensor>& ce_weight_t,
                            const std::optional<Tensor>& epg_weight_t, double ce_weight, double epg_weight,
                            double entropy_weight, double label_smoothing, int64_t ignore_index, int64_t reduction,
                            bool prob_target, const Tensor& stats, const Tensor& denom) {
  return at::empty(logits.sizes(), logits.options());
}

// grad *= grad_loss (0-d), skipped when grad_loss == 1: read on the host for CPU tensors (free),
// on the device for CUDA tensors (no synchronisation).
void native_scale_(Tensor& grad, const Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.dim() == 0, "aepg: the fused gradient is scaled by a 0-d grad_loss");
  TORCH_CHECK(grad.is_contiguous(), "aepg: the fused gradient is contiguous");
  if (grad.numel() == 0) return;
  if (grad.is_cuda()) {
#ifdef AEPG_WITH_CUDA
    const Tensor g = grad_loss.to(grad.device(), accumulation_dtype(grad.scalar_type()));  // no sync
    cuda::scale(grad.data_ptr(), grad.scalar_type(), grad.numel(), g.data_ptr(), g.scalar_type(),
                grad.device().index());
#endif
    return;
  }
  if (grad_loss.item<double>() != 1.0) grad.mul_(grad_loss);
}

void native_scale_meta(Tensor& grad, const Tensor& grad_loss) {}

}  // namespace

// FRAGMENT: the namespace aepg also holds the Python custom ops (aepg_kernels/_op.py).
TORCH_LIBRARY_FRAGMENT(aepg, m) {
  m.def(
      "native_forward(Tensor logits, Tensor target, Tensor? weight, Tensor? ce_weight_t, Tensor? epg_weight_t, "
      "float ce_weight, float epg_weight, float entropy_weight, float label_smoothing, float focal_gamma, "
      "int ignore_index, int reduction, bool prob_target, Tensor denom, bool need_entropy, bool write_grad) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "native_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor? ce_weight_t, "
      "Tensor? epg_weight_t, float ce_weight, float epg_weight, float entropy_weight, float label_smoothing, "
      "int ignore_index, int reduction, bool prob_target, Tensor stats, Tensor denom) -> Tensor");
  m.def("native_scale_(Tensor(a!) grad, Tensor grad_loss) -> ()");
}

TORCH_LIBRARY_IMPL(aepg, CPU, m) {
  m.impl("native_forward", &native_forward);
  m.impl("native_backward", &native_backward);
  m.impl("native_scale_", &native_scale_);
}

#ifdef AEPG_WITH_CUDA
TORCH_LIBRARY_IMPL(aepg, CUDA, m) {
  m.impl("native_forward", &native_forward);
  m.impl("native_backward", &native_backward);
  m.impl("native_scale_", &native_scale_);
}
#endif

TORCH_LIBRARY_IMPL(aepg, Meta, m) {
  m.impl("native_forward", &native_forward_meta);
  m.impl("native_backward", &native_backward_meta);
  m.impl("native_scale_", &native_scale_meta);
}

}  // namespace aepg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native CPU and CUDA kernels of aepg_kernels (operators in torch.ops.aepg)";
  m.attr("HAS_CPU") = true;
#ifdef AEPG_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
  m.attr("CUDA_MAX_ON_CHIP_COLS") = aepg::cuda::kMaxOnChipCols;
  m.def("cpu_capability", &aepg::cpu::capability, "the instruction set the CPU kernels use");
}

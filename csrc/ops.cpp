// The operators of the native backends and the Python module aepg_kernels._C.
//
//   aepg::policy_loss     the differentiable entry point: an Autograd kernel in C++, so that an
//                         eager call, its autograd node and its backward never enter Python;
//   aepg::native_forward  loss, stats, fused gradient and "mean" denominator (CPU, CUDA, Meta);
//   aepg::native_backward the gradient recomputed from the saved stats (CPU, CUDA, Meta);
//   aepg::native_forward_out / native_backward_out: the same into a gradient buffer the caller
//                         reuses (the chunks of the linear op, aepg_kernels/_linear.py);
//   aepg::native_scale_   grad *= grad_loss in place, skipped when grad_loss == 1.
//
// Every operator takes the call of aepg_kernels/_contract.py (csrc/contract.h): the tensors, then
// `float[] scalars` indexed by Scalar and `int flags` of Flag bits. `unpack` turns a call into the
// KernelArgs the CPU and CUDA kernels read. A traced call (torch.compile, make_fx, fake tensors)
// runs the same Autograd kernel, which records native_forward / native_backward in the graph.
#include "contract.h"
#include "kernel_args.h"
#include "cpu/gradient_blocks.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

// The arguments of a call, in the order of the schemas below.
#define AEPG_CALL_PARAMS                                                                 \
  const Tensor &logits, const Tensor &target, const std::optional<Tensor>&weight,        \
      const std::optional<Tensor>&ce_weight_t, const std::optional<Tensor>&epg_weight_t, \
      c10::ArrayRef<double> scalars, int64_t ignore_index, int64_t flags
#define AEPG_CALL_ARGS logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, flags
#define AEPG_CALL_SCHEMA                                                                      \
  "Tensor logits, Tensor target, Tensor? weight, Tensor? ce_weight_t, Tensor? epg_weight_t, " \
  "float[] scalars, int ignore_index, int flags"

namespace aepg {
namespace {

using at::Tensor;
using Forward = std::tuple<Tensor, Tensor, Tensor, Tensor>;  // loss, stats, grad, denominator

c10::ScalarType accumulation_dtype(c10::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

int64_t reduction_of(int64_t flags) { return flags & kReductionMask; }

// Whether the forward can write the gradient: a reduced loss (every row's upstream scale is then
// known) and, on CUDA, a row that stays on chip.
bool fuses_grad(const Tensor& logits, int64_t flags) {
  return reduction_of(flags) != kReductionNone && (!logits.is_cuda() || logits.size(1) <= cuda::kMaxOnChipCols);
}

void check_call(const Tensor& logits, const Tensor& target, c10::ArrayRef<double> scalars, int64_t flags) {
  TORCH_CHECK(logits.dim() == 2, "aepg: logits must be (rows, classes), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "aepg: logits need at least one class");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "aepg: logits must be floating point");
  TORCH_CHECK(target.device() == logits.device(), "aepg: target must be on the logits' device");
  TORCH_CHECK(scalars.size() == kNumScalars, "aepg: scalars must hold ", int(kNumScalars), " values, got ",
              scalars.size());
  TORCH_CHECK(reduction_of(flags) <= kReductionSum, "aepg: flags hold an unknown reduction");
  if (flags & kProbTarget) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "aepg: probability targets must have the logits' shape");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "aepg: targets must be (rows,)");
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                "aepg: class indices must be int64 or int32");
  }
}

// The KernelArgs of a call. `keep` holds converted tensors until the kernels have run (on CUDA the
// caching allocator orders their reuse after the launch on this stream).
KernelArgs unpack(AEPG_CALL_PARAMS, std::vector<Tensor>& keep) {
  check_call(logits, target, scalars, flags);
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
  if (logits.stride(1) != 1) keep.push_back(logits.contiguous());
  const Tensor& rows = logits.stride(1) == 1 ? logits : keep.back();
  args.logits = rows.data_ptr();
  args.logits_stride = rows.stride(0);
  args.prob_target = flags & kProbTarget;
  if (args.prob_target) {
    args.target = in_acc(target);
    args.q_stride = args.n_cols;
  } else {
    keep.push_back(target.contiguous());
    args.target = keep.back().data_ptr();
    args.target_int32 = target.scalar_type() == at::kInt;
  }
  args.a = scalars[kCeWeight];
  args.b = scalars[kEpgWeight];
  args.beta = scalars[kEntropyWeight];
  args.eps = scalars[kLabelSmoothing];
  args.gamma = scalars[kFocalGamma];
  args.focal = args.gamma > 0;
  args.entropy = (flags & kNeedEntropy) || args.beta != 0;
  args.ignore_index = ignore_index;
  args.mean = reduction_of(flags) == kReductionMean;
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == args.n_cols, "aepg: weight must be (classes,)");
    args.weight = in_acc(*weight);
    if (args.eps > 0 || args.prob_target) args.w_total = in_acc(keep.back().sum());
  }
  if (ce_weight_t.has_value()) args.a_ptr = in_acc(*ce_weight_t);
  args.b_one_minus_a = flags & kEpgOneMinusCe;
  TORCH_CHECK(!args.b_one_minus_a || (args.a_ptr && !epg_weight_t.has_value()),
              "aepg: Flag.EPG_ONE_MINUS_CE needs a CE weight tensor and no EPG weight tensor");
  if (epg_weight_t.has_value()) args.b_ptr = in_acc(*epg_weight_t);
  return args;
}

// ---- the "mean" denominator and the reduction ---------------------------------------------------
// As nn.CrossEntropyLoss: the summed class weights of the counted rows for index targets, the
// number of rows for probability targets.

// CPU: one pass over the targets, which also refuses an out-of-range class index. Without class
// weights the counted rows are counted in an integer (no chain of dependent float adds).
template <class T, class Index>
double cpu_denominator(const KernelArgs& args, const Index* target) {
  const T* weight = static_cast<const T*>(args.weight);
  double total = 0;
  int64_t counted = 0;
  for (int64_t i = 0; i < args.n_rows; ++i) {
    const int64_t y = target[i];
    if (y == args.ignore_index) continue;
    TORCH_CHECK_INDEX(y >= 0 && y < args.n_cols, "target: class index ", y, " is out of bounds for C=", args.n_cols,
                      " (and is not ignore_index=", args.ignore_index, ")");
    if (weight) {
      total += static_cast<double>(weight[y]);
    } else {
      ++counted;
    }
  }
  return weight ? total : static_cast<double>(counted);
}

template <class T>
double cpu_denominator(const KernelArgs& args) {
  if (args.prob_target) return static_cast<double>(args.n_rows);
  return args.target_int32 ? cpu_denominator<T>(args, static_cast<const int32_t*>(args.target))
                           : cpu_denominator<T>(args, static_cast<const int64_t*>(args.target));
}

// CUDA: the same sum as tensor ops, with no host synchronisation (out-of-range rows are counted;
// the kernels make their loss NaN).
Tensor cuda_denominator(const Tensor& target, const std::optional<Tensor>& weight, int64_t ignore_index,
                        bool prob_target, int64_t n_rows, const at::TensorOptions& acc) {
  if (prob_target) return at::full({}, static_cast<double>(n_rows), acc);
  const Tensor counted = target.ne(ignore_index);
  if (!weight.has_value()) return counted.sum(at::kDouble).to(acc.dtype());
  const Tensor safe = at::where(counted & target.ge(0) & target.lt(weight->size(0)), target, 0);
  return at::where(counted, weight->to(acc.dtype()).index_select(0, safe.reshape(-1)), 0).sum();
}

// A new tensor on the logits' device; on the CPU without a trip through the dispatcher (host
// time is the whole cost of a small call).
Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? Tensor(at::detail::empty_cpu(sizes, options)) : at::empty(sizes, options);
}

// The gradient of a call. On the CPU a large one comes from memory kept between calls
// (csrc/cpu/gradient_blocks.h) and is written with streaming stores when that memory held an
// earlier gradient: its lines are then not in cache, and streaming stores skip reading them for
// ownership (the forward with gradient at 8192 x 32000 fp32, into a block in use before: 307 ->
// 256 ms at one thread, 165 -> 133 ms at two, timed by hand on 2026-12-02 on the machine of
// benchmarks/README.md "CPU kernel"). Fresh pages, which the OS has just zeroed, are in cache:
// there plain stores merge with those lines.
cpu::gradient_blocks::Gradient new_gradient(const Tensor& logits) {
  if (logits.is_cpu()) return cpu::gradient_blocks::empty(logits.sizes(), logits.options());
  return {at::empty(logits.sizes(), logits.options()), false};
}

// The sum of the per-row losses in four independent accumulators (one chain of dependent adds
// would cost 4 cycles a row).
template <class T>
double sum_of(const void* values, int64_t n) {
  const T* v = static_cast<const T*>(values);
  double part[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) part[j] += v[i + j];
  }
  for (; i < n; ++i) part[0] += v[i];
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// CPU: the denominator and the reduction on the host, the per-row losses of a reduced loss in a
// host buffer rather than a tensor; returns the loss in the logits' dtype.
Tensor cpu_forward(KernelArgs& args, Tensor& denom, int64_t reduction, const at::TensorOptions& options) {
  const double total_weight = args.fp64 ? cpu_denominator<double>(args) : cpu_denominator<float>(args);
  if (args.fp64) {
    *denom.data_ptr<double>() = total_weight;
  } else {
    *denom.data_ptr<float>() = static_cast<float>(total_weight);
  }
  args.denom = denom.data_ptr();
  if (reduction == kReductionNone) {
    Tensor row_loss = new_empty({args.n_rows}, denom.options());
    args.loss = row_loss.data_ptr();
    if (args.n_rows > 0) cpu::forward(args);
    return row_loss.to(options.dtype());
  }
  std::vector<double> row_loss(args.n_rows);  // room for n_rows values of the accumulation dtype
  args.loss = row_loss.data();
  if (args.n_rows > 0) cpu::forward(args);
  double total = args.fp64 ? sum_of<double>(args.loss, args.n_rows) : sum_of<float>(args.loss, args.n_rows);
  if (reduction == kReductionMean) total /= total_weight;
  Tensor loss = new_empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "aepg_cpu_forward",
                                  [&] { *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(total); });
  return loss;
}

// CUDA: the denominator and the reduction as tensor ops, no host synchronisation.
Tensor cuda_forward(KernelArgs& args, const Tensor& target, const std::optional<Tensor>& weight, int64_t ignore_index,
                    Tensor& denom, int64_t reduction) {
  denom = cuda_denominator(target, weight, ignore_index, args.prob_target, args.n_rows, denom.options());
  args.denom = denom.data_ptr();
  Tensor row_loss = at::empty({args.n_rows}, denom.options());
  args.loss = row_loss.data_ptr();
#ifdef AEPG_WITH_CUDA
  if (args.n_rows > 0) cuda::forward(args);
#endif
  if (reduction == kReductionNone) return row_loss.to(args.dtype);
  const Tensor total = row_loss.sum();
  return (reduction == kReductionMean ? total / denom : total).to(args.dtype);
}

// The forward into `grad` (defined: the gradient is written there, streamed when `stream_grad`;
// undefined: not written).
Forward run_forward(AEPG_CALL_PARAMS, Tensor grad, bool stream_grad) {
  std::vector<Tensor> keep;
  KernelArgs args = unpack(AEPG_CALL_ARGS, keep);
  const auto acc = logits.options().dtype(accumulation_dtype(logits.scalar_type()));
  Tensor stats = new_empty({kNumStats, args.n_rows}, acc);
  Tensor denom = new_empty({}, acc);
  args.stats = stats.data_ptr();
  args.grad = grad.defined() ? grad.data_ptr() : nullptr;
  args.stream_grad = stream_grad;
  Tensor loss = logits.is_cuda() ? cuda_forward(args, target, weight, ignore_index, denom, reduction_of(flags))
                                 : cpu_forward(args, denom, reduction_of(flags), logits.options());
  return {loss, stats, grad.defined() ? grad : new_empty({0}, logits.options()), denom};
}

void check_fused_grad(const Tensor& logits, int64_t flags) {
  TORCH_CHECK(fuses_grad(logits, flags), "aepg: the fused gradient needs a reduced loss and, on CUDA, a row on ",
              "chip (C <= ", cuda::kMaxOnChipCols, "), got C=", logits.size(-1));
}

// A gradient buffer the caller passes: the logits' shape, dtype and device, contiguous.
void check_grad_out(const Tensor& grad, const Tensor& logits) {
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device() == logits.device() && grad.is_contiguous(),
              "aepg: grad must be a contiguous tensor of the logits' shape, dtype and device, got ", grad.sizes(), " ",
              grad.scalar_type(), " on ", grad.device());
}

Forward native_forward(AEPG_CALL_PARAMS) {
  check_call(logits, target, scalars, flags);
  const bool write_grad = flags & kWriteGrad;
  if (write_grad) check_fused_grad(logits, flags);
  if (!write_grad) return run_forward(AEPG_CALL_ARGS, Tensor(), false);
  auto [grad, recycled] = new_gradient(logits);
  return run_forward(AEPG_CALL_ARGS, grad, recycled);
}

// The forward writing the gradient into a buffer the caller reuses (the chunks of the linear op),
// with plain stores: the caller reads it next, and in the linear op it holds the chunk's logits,
// just read.
std::tuple<Tensor, Tensor, Tensor> native_forward_out(Tensor& grad, AEPG_CALL_PARAMS) {
  check_fused_grad(logits, flags);
  check_grad_out(grad, logits);
  auto [loss, stats, unused, denom] = run_forward(logits, target, weight, ce_weight_t, epg_weight_t, scalars,
                                                  ignore_index, flags | kWriteGrad, grad, false);
  return {loss, stats, denom};
}

std::tuple<Tensor, Tensor, Tensor> native_forward_out_meta(Tensor& grad, AEPG_CALL_PARAMS) {
  check_call(logits, target, scalars, flags);
  const auto acc = logits.options().dtype(accumulation_dtype(logits.scalar_type()));
  const bool reduced = reduction_of(flags) != kReductionNone;
  return {reduced ? at::empty({}, logits.options()) : at::empty({logits.size(0)}, logits.options()),
          at::empty({kNumStats, logits.size(0)}, acc), at::empty({}, acc)};
}

Forward native_forward_meta(AEPG_CALL_PARAMS) {
  check_call(logits, target, scalars, flags);
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const auto acc = logits.options().dtype(accumulation_dtype(logits.scalar_type()));
  const bool reduced = reduction_of(flags) != kReductionNone;
  return {reduced ? at::empty({}, logits.options()) : at::empty({n_rows}, logits.options()),
          at::empty({kNumStats, n_rows}, acc),
          at::empty(flags & kWriteGrad ? at::IntArrayRef{n_rows, n_cols} : at::IntArrayRef{0}, logits.options()),
          at::empty({}, acc)};
}

void run_backward(Tensor& grad, const Tensor& grad_loss, AEPG_CALL_PARAMS, const Tensor& stats, const Tensor& denom) {
  std::vector<Tensor> keep;
  KernelArgs args = unpack(AEPG_CALL_ARGS, keep);
  if (args.n_rows == 0) return;
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == args.n_rows),
              "aepg: grad_loss must be 0-d or (rows,)");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kNumStats && stats.size(1) == args.n_rows, "aepg: stats must be (",
              int(kNumStats), ", rows)");
  const auto acc = accumulation_dtype(logits.scalar_type());
  keep.push_back(grad_loss.to(acc));  // keeps its stride (0-d: stride 0)
  args.grad_loss = keep.back().data_ptr();
  args.grad_loss_stride = grad_loss.dim() ? keep.back().stride(0) : 0;
  keep.push_back(stats.to(acc).contiguous());
  args.saved_stats = keep.back().data_ptr();
  keep.push_back(denom.to(acc));
  args.denom = keep.back().data_ptr();
  args.entropy = args.beta != 0;
  args.grad = grad.data_ptr();
  if (logits.is_cuda()) {
#ifdef AEPG_WITH_CUDA
    cuda::backward(args);
#endif
  } else {
    cpu::backward(args);
  }
}

Tensor native_backward(const Tensor& grad_loss, AEPG_CALL_PARAMS, const Tensor& stats, const Tensor& denom) {
  Tensor grad = new_gradient(logits).tensor;
  run_backward(grad, grad_loss, AEPG_CALL_ARGS, stats, denom);
  return grad;
}

void native_backward_out(Tensor& grad, const Tensor& grad_loss, AEPG_CALL_PARAMS, const Tensor& stats,
                         const Tensor& denom) {
  check_grad_out(grad, logits);
  run_backward(grad, grad_loss, AEPG_CALL_ARGS, stats, denom);
}

void native_backward_out_meta(Tensor& grad, const Tensor& grad_loss, AEPG_CALL_PARAMS, const Tensor& stats,
                              const Tensor& denom) {}

Tensor native_backward_meta(const Tensor& grad_loss, AEPG_CALL_PARAMS, const Tensor& stats, const Tensor& denom) {
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

// ---- aepg::policy_loss: the autograd node in C++ ------------------------------------------------

const c10::TypedOperatorHandle<Forward(AEPG_CALL_PARAMS)>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("aepg::native_forward", "").typed<Forward(AEPG_CALL_PARAMS)>();
  return op;
}

const c10::TypedOperatorHandle<Tensor(const Tensor&, AEPG_CALL_PARAMS, const Tensor&, const Tensor&)>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aepg::native_backward", "")
                             .typed<Tensor(const Tensor&, AEPG_CALL_PARAMS, const Tensor&, const Tensor&)>();
  return op;
}

// A tensor that a trace sees (fake, functional or proxy tensors, or any dispatch mode): neither
// read on the host nor mutated.
bool traced(const Tensor& t) {
  static const c10::DispatchKeySet python_keys({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return c10::impl::TorchDispatchModeTLS::stack_len() > 0 || t.key_set().has_any(python_keys);
}

// The saved fused gradient times the upstream gradient g (0-d). In eager calls it is scaled in
// place (nothing reads it again unless the graph is retained); under a trace out of place, so
// that the backward graph mutates no forward output.
Tensor scale_fused_grad(Tensor grad, const Tensor& g) {
  if (!traced(grad) && !traced(g)) {
    if (!grad.is_cuda() && g.item<double>() == 1.0) return grad;
    if (!torch::autograd::get_current_graph_task_keep_graph()) {
      native_scale_(grad, g);
      return grad;
    }
  }
  return grad * g.to(grad.scalar_type());
}

std::optional<Tensor> optional_of(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

class PolicyLossFunction : public torch::autograd::Function<PolicyLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, AEPG_CALL_PARAMS) {
    const int64_t call_flags = fuses_grad(logits, flags) ? (flags | kWriteGrad) : flags;
    auto [loss, stats, grad, denom] =
        forward_op().call(logits, target, weight, ce_weight_t, epg_weight_t, scalars, ignore_index, call_flags);
    ctx->saved_data["scalars"] = scalars.vec();
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["flags"] = call_flags;
    if (call_flags & kWriteGrad) {
      ctx->save_for_backward({grad});
    } else {
      ctx->save_for_backward({logits, target, weight.value_or(Tensor()), ce_weight_t.value_or(Tensor()),
                              epg_weight_t.value_or(Tensor()), stats, denom});
    }
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the stats (or an unused loss)
    return {loss, stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const Tensor& grad_loss = grad_outputs[0];
    torch::autograd::variable_list grads(8);  // one per argument of the call; only logits has one
    if (!grad_loss.defined()) return grads;   // the loss took no part in what is differentiated
    const auto saved = ctx->get_saved_variables();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    if (flags & kWriteGrad) {
      grads[0] = scale_fused_grad(saved[0], grad_loss);
      return grads;
    }
    const std::vector<double> scalars = ctx->saved_data["scalars"].toDoubleVector();
    grads[0] = backward_op().call(grad_loss, saved[0], saved[1], optional_of(saved[2]), optional_of(saved[3]),
                                  optional_of(saved[4]), scalars, ctx->saved_data["ignore_index"].toInt(), flags,
                                  saved[5], saved[6]);
    return grads;
  }
};

std::tuple<Tensor, Tensor> policy_loss_autograd(AEPG_CALL_PARAMS) {
  TORCH_CHECK(!(flags & kWriteGrad), "aepg::policy_loss: Flag.WRITE_GRAD is set by the operator, not the caller");
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, stats, grad, denom] = forward_op().call(AEPG_CALL_ARGS);
    return {loss, stats};
  }
  const auto outputs = PolicyLossFunction::apply(AEPG_CALL_ARGS);
  return {outputs[0], outputs[1]};
}

// aepg::policy_loss as the dispatcher sees it (its Autograd kernel, or the one below).
std::tuple<Tensor, Tensor> call_policy_loss(AEPG_CALL_PARAMS) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aepg::policy_loss", "")
                             .typed<std::tuple<Tensor, Tensor>(AEPG_CALL_PARAMS)>();
  return op.call(AEPG_CALL_ARGS);
}

// Below autograd (inference mode, or a caller that dispatches past it): the forward alone.
std::tuple<Tensor, Tensor> policy_loss_forward_only(AEPG_CALL_PARAMS) {
  auto [loss, stats, grad, denom] = forward_op().call(AEPG_CALL_ARGS);
  return {loss, stats};
}

}  // namespace

// FRAGMENT: the namespace aepg also holds the Python custom ops of the Triton backend.
TORCH_LIBRARY_FRAGMENT(aepg, m) {
  m.def("policy_loss(" AEPG_CALL_SCHEMA ") -> (Tensor loss, Tensor stats)");
  m.def("native_forward(" AEPG_CALL_SCHEMA ") -> (Tensor loss, Tensor stats, Tensor grad, Tensor denom)");
  m.def("native_backward(Tensor grad_loss, " AEPG_CALL_SCHEMA ", Tensor stats, Tensor denom) -> Tensor");
  m.def("native_forward_out(Tensor(a!) grad, " AEPG_CALL_SCHEMA ") -> (Tensor loss, Tensor stats, Tensor denom)");
  m.def("native_backward_out(Tensor(a!) grad, Tensor grad_loss, " AEPG_CALL_SCHEMA
        ", Tensor stats, Tensor denom) -> ()");
  m.def("native_scale_(Tensor(a!) grad, Tensor grad_loss) -> ()");
}

TORCH_LIBRARY_IMPL(aepg, Autograd, m) { m.impl("policy_loss", &policy_loss_autograd); }
TORCH_LIBRARY_IMPL(aepg, CompositeExplicitAutograd, m) { m.impl("policy_loss", &policy_loss_forward_only); }

TORCH_LIBRARY_IMPL(aepg, CPU, m) {
  m.impl("native_forward", &native_forward);
  m.impl("native_backward", &native_backward);
  m.impl("native_forward_out", &native_forward_out);
  m.impl("native_backward_out", &native_backward_out);
  m.impl("native_scale_", &native_scale_);
}

#ifdef AEPG_WITH_CUDA
TORCH_LIBRARY_IMPL(aepg, CUDA, m) {
  m.impl("native_forward", &native_forward);
  m.impl("native_backward", &native_backward);
  m.impl("native_forward_out", &native_forward_out);
  m.impl("native_backward_out", &native_backward_out);
  m.impl("native_scale_", &native_scale_);
}
#endif

TORCH_LIBRARY_IMPL(aepg, Meta, m) {
  m.impl("native_forward", &native_forward_meta);
  m.impl("native_backward", &native_backward_meta);
  m.impl("native_forward_out", &native_forward_out_meta);
  m.impl("native_backward_out", &native_backward_out_meta);
  m.impl("native_scale_", &native_scale_meta);
}

}  // namespace aepg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "Native CPU and CUDA kernels of aepg_kernels (operators in torch.ops.aepg)";
  m.attr("HAS_CPU") = true;
#ifdef AEPG_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
  m.attr("CUDA_MAX_ON_CHIP_COLS") = aepg::cuda::kMaxOnChipCols;
  m.def("cpu_capability", &aepg::cpu::capability, "the instruction set the CPU kernels use");
  m.def("release_gradient_blocks", &aepg::cpu::gradient_blocks::release,
        "frees the CPU gradient blocks kept for reuse; returns their bytes");
  m.def(
      "gradient_block_usage",
      [] {
        const auto u = aepg::cpu::gradient_blocks::usage();
        return py::dict(py::arg("kept_bytes") = u.kept_bytes, py::arg("live_bytes") = u.live_bytes,
                        py::arg("peak_bytes") = u.peak_bytes);
      },
      "bytes of the CPU gradient blocks: kept for reuse, in use, and the most ever in use at once");
  // aepg::policy_loss through the dispatcher, without the boxed argument parsing of torch.ops.
  m.def("policy_loss", [](const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& ce_weight_t, const std::optional<at::Tensor>& epg_weight_t,
                          const std::vector<double>& scalars, int64_t ignore_index,
                          int64_t flags) { return aepg::call_policy_loss(AEPG_CALL_ARGS); });
  // The contract's enums (csrc/contract.h), compared with aepg_kernels/_contract.py by the tests.
  py::dict contract;
  contract["Stat"] =
      py::dict(py::arg("LSE") = int(aepg::kLse), py::arg("ENTROPY") = int(aepg::kEntropy),
               py::arg("P_TARGET") = int(aepg::kPTarget), py::arg("SAMPLE_WEIGHT") = int(aepg::kSampleWeight),
               py::arg("ROW_WEIGHT") = int(aepg::kRowWeight), py::arg("AUX") = int(aepg::kAux),
               py::arg("ROW_MAX") = int(aepg::kRowMax), py::arg("LOG_SUM") = int(aepg::kLogSum));
  contract["Scalar"] = py::dict(
      py::arg("CE_WEIGHT") = int(aepg::kCeWeight), py::arg("EPG_WEIGHT") = int(aepg::kEpgWeight),
      py::arg("ENTROPY_WEIGHT") = int(aepg::kEntropyWeight), py::arg("LABEL_SMOOTHING") = int(aepg::kLabelSmoothing),
      py::arg("FOCAL_GAMMA") = int(aepg::kFocalGamma));
  contract["Flag"] =
      py::dict(py::arg("REDUCTION") = int(aepg::kReductionMask), py::arg("PROB_TARGET") = int(aepg::kProbTarget),
               py::arg("NEED_ENTROPY") = int(aepg::kNeedEntropy), py::arg("WRITE_GRAD") = int(aepg::kWriteGrad),
               py::arg("EPG_ONE_MINUS_CE") = int(aepg::kEpgOneMinusCe));
  contract["Reduction"] =
      py::dict(py::arg("NONE") = int(aepg::kReductionNone), py::arg("MEAN") = int(aepg::kReductionMean),
               py::arg("SUM") = int(aepg::kReductionSum));
  m.attr("CONTRACT") = contract;
}

"""Bad input gives a clear error: the right exception type (ValueError, TypeError, IndexError or
RuntimeError) and a message naming the argument at fault. Validation runs before any kernel,
so these tests are cheap on every backend."""

import math

import pytest
import torch

import aepg_kernels as ak
from aepg_kernels.backends import native as _native, resolve, resolve_backend
from tests.helpers import ALL_BACKENDS, DEVICE

C = 5


def _x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (4, C)), device=DEVICE).to(dtype)


def _y(*shape, high=C):
    return torch.randint(0, high, shape or (4,), device=DEVICE)


def _q(*shape):
    return torch.softmax(torch.randn(*(shape or (4, C)), device=DEVICE), -1)


# name -> (thunk building (input, target, kwargs), exception, pattern naming the argument)
CALL_CASES = {
    # ranks and shapes
    "input_0d": (lambda: (torch.tensor(1.0, device=DEVICE), torch.tensor(0, device=DEVICE), {}), ValueError, "input"),
    "input_not_tensor": (lambda: ([[0.0, 1.0]], _y(1), {}), TypeError, "input"),
    "input_no_classes": (lambda: (_x(4, 0), _y(4), {}), ValueError, "input"),
    "target_not_tensor": (lambda: (_x(), [0, 1, 2, 3], {}), TypeError, "target"),
    "target_length": (lambda: (_x(), _y(3), {}), ValueError, "target"),
    "target_rank_2d": (lambda: (_x(), _y(4, 1), {}), ValueError, "target"),
    "target_rank_vector_input": (lambda: (_x(C), _y(1), {}), ValueError, "target"),
    "target_spatial_dims": (lambda: (_x(2, C, 3, 4), _y(2, 4, 3), {}), ValueError, "target"),
    "target_spatial_rank": (lambda: (_x(2, C, 3, 4), _y(2, 3), {}), ValueError, "target"),
    "prob_target_shape": (lambda: (_x(), _q(4, C + 1), {}), ValueError, "target"),
    "prob_target_rank": (lambda: (_x(), _q(4, C)[:, 0], {}), ValueError, "target"),
    "prob_target_spatial": (lambda: (_x(2, C, 3), _q(2, 3, C), {}), ValueError, "target"),
    "target_other_device": (lambda: (_x(), torch.zeros(4, dtype=torch.long, device="meta"), {}), ValueError, "target"),
    # dtypes
    "input_int64": (lambda: (torch.randint(0, 3, (4, C), device=DEVICE), _y(), {}), TypeError, "input"),
    "input_int32": (
        lambda: (torch.randint(0, 3, (4, C), device=DEVICE, dtype=torch.int32), _y(), {}),
        TypeError,
        "input",
    ),
    "input_bool": (lambda: (torch.ones(4, C, dtype=torch.bool, device=DEVICE), _y(), {}), TypeError, "input"),
    "input_complex": (lambda: (torch.randn(4, C, dtype=torch.complex64, device=DEVICE), _y(), {}), TypeError, "input"),
    "target_uint8": (lambda: (_x(), _y().to(torch.uint8), {}), TypeError, "target"),
    "target_int16": (lambda: (_x(), _y().to(torch.int16), {}), TypeError, "target"),
    "target_bool": (lambda: (_x(), _y() > 2, {}), TypeError, "target"),
    "prob_target_float8": (lambda: (_x(), _q().to(torch.float8_e4m3fn), {}), TypeError, "target"),
    "target_requires_grad": (lambda: (_x(), _q().requires_grad_(True), {}), ValueError, "target"),
    # target range
    "target_too_large": (lambda: (_x().cpu(), torch.tensor([0, 1, C, 2]), {}), IndexError, "target"),
    "target_negative": (lambda: (_x().cpu(), torch.tensor([0, 1, -3, 2]), {}), IndexError, "target"),
    "target_far_out": (lambda: (_x().cpu(), torch.tensor([2**40, 1, 0, 2]), {}), IndexError, "target"),
    # reduction, backend
    "reduction_avg": (lambda: (_x(), _y(), dict(reduction="avg")), ValueError, "reduction"),
    "reduction_upper": (lambda: (_x(), _y(), dict(reduction="MEAN")), ValueError, "reduction"),
    "reduction_none_object": (lambda: (_x(), _y(), dict(reduction=None)), ValueError, "reduction"),
    # class weights
    "weight_short": (lambda: (_x(), _y(), dict(weight=torch.ones(C - 1, device=DEVICE))), ValueError, "weight"),
    "weight_long": (lambda: (_x(), _y(), dict(weight=torch.ones(C + 1, device=DEVICE))), ValueError, "weight"),
    "weight_2d": (lambda: (_x(), _y(), dict(weight=torch.ones(C, 1, device=DEVICE))), ValueError, "weight"),
    "weight_0d": (lambda: (_x(), _y(), dict(weight=torch.tensor(1.0, device=DEVICE))), ValueError, "weight"),
    "weight_int": (
        lambda: (_x(), _y(), dict(weight=torch.ones(C, dtype=torch.long, device=DEVICE))),
        TypeError,
        "weight",
    ),
    "weight_list": (lambda: (_x(), _y(), dict(weight=[1.0] * C)), TypeError, "weight"),
    "weight_meta_device": (lambda: (_x(), _y(), dict(weight=torch.ones(C, device="meta"))), ValueError, "weight"),
    "weight_requires_grad": (
        lambda: (_x(), _y(), dict(weight=torch.ones(C, device=DEVICE, requires_grad=True))),
        ValueError,
        "weight",
    ),
    # scalar hyper-parameters
    "label_smoothing_negative": (lambda: (_x(), _y(), dict(label_smoothing=-0.1)), ValueError, "label_smoothing"),
    "label_smoothing_above_1": (lambda: (_x(), _y(), dict(label_smoothing=1.1)), ValueError, "label_smoothing"),
    "label_smoothing_nan": (lambda: (_x(), _y(), dict(label_smoothing=math.nan)), ValueError, "label_smoothing"),
    "label_smoothing_str": (lambda: (_x(), _y(), dict(label_smoothing="0.1")), TypeError, "label_smoothing"),
    "focal_gamma_negative": (lambda: (_x(), _y(), dict(focal_gamma=-1.0)), ValueError, "focal_gamma"),
    "focal_gamma_inf": (lambda: (_x(), _y(), dict(focal_gamma=math.inf)), ValueError, "focal_gamma"),
    "focal_gamma_nan": (lambda: (_x(), _y(), dict(focal_gamma=math.nan)), ValueError, "focal_gamma"),
    "focal_gamma_prob_target": (lambda: (_x(), _q(), dict(focal_gamma=2.0)), ValueError, "focal_gamma"),
    "entropy_weight_nan": (lambda: (_x(), _y(), dict(entropy_weight=math.nan)), ValueError, "entropy_weight"),
    "entropy_weight_inf": (lambda: (_x(), _y(), dict(entropy_weight=math.inf)), ValueError, "entropy_weight"),
    "entropy_weight_neg_inf": (lambda: (_x(), _y(), dict(entropy_weight=-math.inf)), ValueError, "entropy_weight"),
    "entropy_weight_bool": (lambda: (_x(), _y(), dict(entropy_weight=True)), TypeError, "entropy_weight"),
    "ce_weight_1d": (lambda: (_x(), _y(), dict(ce_weight=torch.tensor([0.5], device=DEVICE))), ValueError, "ce_weight"),
    "ce_weight_meta_device": (
        lambda: (_x(), _y(), dict(ce_weight=torch.tensor(0.5, device="meta"))),
        ValueError,
        "ce_weight",
    ),
    "ce_weight_int_tensor": (
        lambda: (_x(), _y(), dict(ce_weight=torch.tensor(1, device=DEVICE))),
        TypeError,
        "ce_weight",
    ),
    "ce_weight_nan": (lambda: (_x(), _y(), dict(ce_weight=math.nan)), ValueError, "ce_weight"),
    "epg_weight_1d": (
        lambda: (_x(), _y(), dict(epg_weight=torch.tensor([0.5], device=DEVICE))),
        ValueError,
        "epg_weight",
    ),
    "epg_weight_str": (lambda: (_x(), _y(), dict(epg_weight="1")), TypeError, "epg_weight"),
    "ignore_index_float": (lambda: (_x(), _y(), dict(ignore_index=1.5)), TypeError, "ignore_index"),
    "ignore_index_bool": (lambda: (_x(), _y(), dict(ignore_index=True)), TypeError, "ignore_index"),
    "ignore_index_tensor": (lambda: (_x(), _y(), dict(ignore_index=torch.tensor(-100))), TypeError, "ignore_index"),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(CALL_CASES))
def test_policy_loss_rejects(case, backend):
    """policy_loss raises the documented exception type with a message naming the argument."""
    build, exception, pattern = CALL_CASES[case]
    x, y, kw = build()
    with pytest.raises(exception, match=pattern):
        ak.policy_loss(x, y, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["gpu", "Triton", "native", "", None, 0])
def test_bad_backend_name(backend):
    """An unknown backend name: ValueError listing the backends."""
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'cuda', 'triton', 'cpu', 'eager'"):
        ak.policy_loss(_x(), _y(), backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type (CUDA)")
@pytest.mark.parametrize("argument", ["weight", "target", "ce_weight"])
def test_cross_device_arguments(argument):
    """weight, target or a tensor coefficient on another device than the input: ValueError."""
    other = "cpu" if DEVICE == "cuda" else "cuda"
    x, y, kw = _x(), _y(), {}
    if argument == "target":
        y = y.to(other)
    elif argument == "weight":
        kw["weight"] = torch.ones(C, device=other)
    else:
        kw["ce_weight"] = torch.tensor(0.5, device=other)
    with pytest.raises(ValueError, match=argument):
        ak.policy_loss(x, y, **kw)


def test_out_of_range_message_names_the_index():
    """The IndexError names the offending class index, C and ignore_index."""
    with pytest.raises(IndexError, match=r"class index 9 is out of bounds for C=5 \(and is not ignore_index=-100\)"):
        ak.policy_loss(torch.randn(3, C), torch.tensor([0, 9, 1]))


def test_reduction_unhashable():
    """A list as reduction is rejected with an error that names `reduction`."""
    with pytest.raises((TypeError, ValueError), match="reduction"):
        ak.policy_loss(_x(), _y(), reduction=["mean"])


def test_detached_weight_and_target_are_accepted_under_no_grad():
    """The requires-grad checks apply only with grad enabled: under no_grad the same call works."""
    with torch.no_grad():
        loss = ak.policy_loss(_x(), _q().requires_grad_(True), weight=torch.ones(C, device=DEVICE, requires_grad=True))
    assert torch.isfinite(loss)


# --- aepg_loss and the modules ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_aepg_alpha_out_of_range(alpha):
    """aepg_loss: alpha must be a number in [0, 1] (or a 0-d tensor)."""
    with pytest.raises(ValueError, match="alpha"):
        ak.aepg_loss(_x(), _y(), alpha)


@pytest.mark.parametrize("alpha", [torch.tensor([0.5]), torch.tensor([[0.5]])])
def test_aepg_alpha_tensor_not_0d(alpha):
    """aepg_loss: a tensor alpha must be 0-d (the error names the coefficient it becomes)."""
    with pytest.raises(ValueError, match="ce_weight"):
        ak.aepg_loss(_x(), _y(), alpha.to(DEVICE))


def test_aepg_module_rejects_non_schedule():
    """AEPGLoss needs an AlphaSchedule (a float alpha is a TypeError naming `schedule`)."""
    with pytest.raises(TypeError, match="schedule"):
        ak.AEPGLoss(0.5)


@pytest.mark.parametrize("name", ["ce_weight", "epg_weight"])
def test_aepg_module_rejects_fixed_weights(name):
    """AEPGLoss sets ce_weight/epg_weight from the schedule: passing either is a TypeError naming it."""
    with pytest.raises(TypeError, match=name):
        ak.AEPGLoss(ak.SigmoidAnneal(10), **{name: 0.5})


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(reduction="avg"), "reduction"),
        (dict(label_smoothing=2.0), "label_smoothing"),
        (dict(backend="gpu"), "backend"),
    ],
)
def test_policy_loss_module_rejects(kw, pattern):
    """PolicyLoss rejects bad options when it is made (the backend on the first call)."""
    with pytest.raises(ValueError, match=pattern):
        ak.PolicyLoss(**kw)(_x(), _y())


# --- schedules ----------------------------------------------------------------------------------

SCHEDULES = [ak.SigmoidAnneal, ak.LinearAnneal, ak.CosineAnneal]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.__name__)
@pytest.mark.parametrize("total_steps", [0, -1, 1.5, True, None, "10"])
def test_schedule_total_steps(schedule, total_steps):
    """total_steps must be an int >= 1, at construction and in reset() (where None keeps it)."""
    with pytest.raises(ValueError, match="total_steps"):
        schedule(total_steps)
    if total_steps is not None:
        with pytest.raises(ValueError, match="total_steps"):
            schedule(10).reset(total_steps)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf])
def test_sigmoid_tau(tau):
    """SigmoidAnneal: tau must be a finite number > 0."""
    with pytest.raises(ValueError, match="tau"):
        ak.SigmoidAnneal(10, tau=tau)


@pytest.mark.parametrize("alpha", [1.5, -0.1, math.nan, True])
def test_constant_alpha_range(alpha):
    """ConstantAlpha: alpha must be a number in [0, 1]."""
    with pytest.raises(ValueError, match="alpha"):
        ak.ConstantAlpha(alpha)


# --- backends -----------------------------------------------------------------------------------


@pytest.fixture
def uncached_resolve():
    """resolve() caches its answer per process; these tests change what is available."""
    resolve.cache_clear()
    yield
    resolve.cache_clear()


@pytest.mark.parametrize("backend,device", [("cpu", "cpu"), ("cuda", "cuda")])
def test_native_backend_not_built(backend, device, monkeypatch, uncached_resolve):
    """Selecting "cpu"/"cuda" while the native extension is not built (simulated, so that the test
    runs whatever this machine built): a RuntimeError that says it is not built (resolve_backend
    checks the device type only, so no GPU is needed)."""
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", "it is not built")
    with pytest.raises(RuntimeError, match=rf"backend='{backend}'.*aepg_kernels\._C.*not built"):
        resolve_backend(backend, torch.device(device))
    if device == "cpu":
        with pytest.raises(RuntimeError, match="not built"):
            ak.policy_loss(torch.randn(3, C), torch.tensor([0, 1, 2]), backend=backend)


@pytest.mark.parametrize("backend,device", [("cuda", "cpu"), ("cpu", "cuda"), ("cpu", "meta"), ("triton", "meta")])
def test_backend_on_wrong_device(backend, device):
    """A backend that cannot run on the tensors' device: ValueError naming the backend."""
    with pytest.raises(ValueError, match=rf"backend='{backend}'"):
        resolve_backend(backend, torch.device(device))


def test_triton_on_cpu_without_interpreter(monkeypatch, uncached_resolve):
    """backend="triton" for CPU tensors needs TRITON_INTERPRET=1: ValueError naming the backend."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton'.*TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


def test_module_checks_options_assigned_after_a_call():
    """PolicyLoss keeps its validated options between calls; assigning one checks it again."""
    x, y = _x(), _y()
    criterion = ak.PolicyLoss()
    torch.testing.assert_close(criterion(x, y), torch.nn.functional.cross_entropy(x, y))
    with pytest.raises(ValueError, match="label_smoothing"):
        criterion.label_smoothing = 1.5
    assert criterion.label_smoothing == 0.0  # the refused value was not kept
    criterion.reduction = "sum"
    torch.testing.assert_close(criterion(x, y), torch.nn.functional.cross_entropy(x, y, reduction="sum"))


def test_module_follows_coefficients_assigned_after_a_call():
    """The module packs its hyperparameters once and again when a coefficient changes: a new
    float, a bad value (refused at the assignment, the module unchanged), a tensor updated in place."""
    x, y = _x(), _y()
    criterion = ak.PolicyLoss()
    criterion(x, y)
    criterion.ce_weight, criterion.epg_weight = 0.25, 0.75
    torch.testing.assert_close(criterion(x, y), ak.aepg_loss(x, y, 0.25, backend="eager"))
    with pytest.raises(ValueError, match="epg_weight"):
        criterion.epg_weight = float("nan")
    with pytest.raises(ValueError, match="ce_weight"):
        criterion.ce_weight = torch.ones(2)
    assert (criterion.ce_weight, criterion.epg_weight) == (0.25, 0.75)
    alpha = torch.tensor(0.5)
    criterion.ce_weight, criterion.epg_weight = alpha, 1.0
    criterion(x, y)
    alpha.fill_(0.1)
    torch.testing.assert_close(criterion(x, y), ak.policy_loss(x, y, ce_weight=0.1, epg_weight=1.0, backend="eager"))


def test_module_refuses_a_coefficient_on_another_device():
    criterion = ak.PolicyLoss(ce_weight=torch.tensor(0.5, device="meta"))
    with pytest.raises(ValueError, match=r"ce_weight must be on the input's device"):
        criterion(_x(), _y())


@pytest.mark.parametrize(
    "x,y",
    [
        (_x(), _y().float()),  # float class indices
        (_x(), _y().to(torch.int16)),  # an index dtype the op does not take
        (_x().to(torch.int32), _y()),  # integer logits
        (_x(4, 0), _y(4, high=1)),  # no classes
        (_x(), _y()[:-1]),  # one target short
        (_x(), _y() + C),  # a class index out of range
    ],
    ids=["float-target", "int16-target", "int-logits", "no-classes", "short-target", "out-of-range"],
)
def test_module_raises_the_typed_errors_of_a_call_its_operator_refuses(x, y):
    """The module's eager call leaves dtypes, shapes and devices to the native operator; a call it
    refuses gets the error that policy_loss raises for it, not the operator's."""
    with pytest.raises(Exception) as expected:
        ak.policy_loss(x, y)
    with pytest.raises(type(expected.value)) as got:
        ak.PolicyLoss()(x, y)
    assert str(got.value) == str(expected.value)


def test_module_follows_a_backend_assigned_after_a_call():
    """The module keeps the backend of its eager calls until the backend is assigned again."""
    x, y = _x(), _y()
    criterion = ak.PolicyLoss()
    criterion(x, y)
    criterion.backend = "no such backend"
    with pytest.raises(ValueError, match="backend must be one of"):
        criterion(x, y)

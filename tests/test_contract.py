"""The op contract (aepg_kernels/_contract.py) and the backend registry: Python and C++ agree on
every enum, pack and unpack are inverses, and every name list derives from the registry."""

import typing

import pytest
import torch

import aepg_kernels as ak
from aepg_kernels import _contract
from aepg_kernels._contract import Flag, LossSpec, Reduction, Scalar, Stat
from aepg_kernels.backends import BACKEND_NAMES, KERNEL_BACKENDS, REGISTRY, Backend, KernelBackend, native

ENUMS = {"Stat": Stat, "Scalar": Scalar, "Flag": Flag, "Reduction": Reduction}


@pytest.mark.skipif(not native.has_cpu_kernels(), reason=native.native_error())
@pytest.mark.parametrize("name", list(ENUMS))
def test_cpp_enums_equal_the_python_ones(name):
    """csrc/contract.h mirrors _contract.py: same names, same values (exported by _C)."""
    python = {key: int(member) for key, member in ENUMS[name].__members__.items()}  # IntFlag: masks too
    assert dict(native._C.CONTRACT[name]) == python


def test_scalar_positions_are_the_list_positions():
    assert [int(s) for s in Scalar] == list(range(_contract.NUM_SCALARS))
    assert [int(s) for s in Stat] == list(range(_contract.NUM_STATS))
    assert Flag.REDUCTION == 3 and all(r & ~Flag.REDUCTION == 0 for r in Reduction)


SPECS = [
    LossSpec(),
    LossSpec(
        ce_weight=0.25,
        epg_weight=0.75,
        entropy_weight=-0.5,
        label_smoothing=0.1,
        focal_gamma=2.0,
        ignore_index=7,
        reduction=Reduction.SUM,
    ),
    LossSpec(ce_weight=torch.tensor(0.3), epg_weight=torch.tensor(0.7), reduction=Reduction.NONE, prob_target=True),
    LossSpec(ce_weight=torch.tensor(0.3), epg_weight=_contract.ONE_MINUS_CE_WEIGHT, entropy_weight=0.1),
]


@pytest.mark.parametrize("spec", SPECS, ids=["default", "floats", "tensors", "one-minus"])
@pytest.mark.parametrize("need_entropy", [False, True])
def test_pack_and_unpack_are_inverses(spec, need_entropy):
    a_t, b_t, scalars, ignore_index, flags = spec.pack(need_entropy)
    assert len(scalars) == _contract.NUM_SCALARS and all(isinstance(v, float) for v in scalars)
    assert type(flags) is int and bool(flags & Flag.NEED_ENTROPY) == need_entropy
    assert flags & Flag.REDUCTION == spec.reduction and not flags & Flag.WRITE_GRAD
    if isinstance(spec.ce_weight, float):
        assert a_t is None and scalars[Scalar.CE_WEIGHT] == spec.ce_weight
    else:
        assert a_t is spec.ce_weight and scalars[Scalar.CE_WEIGHT] == 0.0
    one_minus = spec.epg_weight is _contract.ONE_MINUS_CE_WEIGHT
    assert bool(flags & Flag.EPG_ONE_MINUS_CE) == one_minus and (b_t is None) == (not torch.is_tensor(spec.epg_weight))
    assert scalars[Scalar.FOCAL_GAMMA] == spec.focal_gamma
    assert LossSpec.unpack(a_t, b_t, scalars, ignore_index, flags) == spec


@pytest.mark.parametrize("backend", ["eager"] + [b for b in ("cpu", "triton") if b in ak.available_backends()])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tensor_alpha_takes_the_epg_weight_from_alpha(backend, reduction):
    """aepg_loss with a 0-d tensor alpha passes no `1 - alpha` tensor (Flag.EPG_ONE_MINUS_CE): the
    kernels compute b = 1 - a, with the same loss, stats and gradient as explicit weights."""
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (6,))
    alpha = torch.tensor(0.3, dtype=torch.float64)
    loss, stats = ak.aepg_loss(x, y, alpha, entropy_weight=0.1, reduction=reduction, backend=backend, return_stats=True)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    ref, ref_stats = ak.policy_loss(
        x, y, ce_weight=0.3, epg_weight=0.7, entropy_weight=0.1, reduction=reduction, backend="eager", return_stats=True
    )
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(stats.sample_weight, ref_stats.sample_weight, rtol=1e-12, atol=1e-13)


def test_registry_is_the_one_list_of_backends():
    """Names, "auto", the kernel backends, the public exports and the trainer's config all come
    from one registry, whose members satisfy the typed interface."""
    assert BACKEND_NAMES == ("auto",) + tuple(REGISTRY) and ak.BACKEND_NAMES == BACKEND_NAMES
    assert set(REGISTRY) == {"cuda", "triton", "cpu", "eager"}
    assert all(isinstance(b, Backend) for b in REGISTRY.values())
    assert KERNEL_BACKENDS == ("cuda", "triton", "cpu") and ak.KERNEL_BACKENDS == KERNEL_BACKENDS
    assert all(isinstance(REGISTRY[name], KernelBackend) for name in KERNEL_BACKENDS)
    assert not isinstance(REGISTRY["eager"], KernelBackend)
    assert set(ak.available_backends()) <= set(REGISTRY)
    pytest.importorskip("timm")
    from aepg_kernels.train.config import LossConfig

    assert typing.get_args(typing.get_type_hints(LossConfig)["backend"]) == BACKEND_NAMES


def test_each_backend_owns_its_on_chip_rule():
    """The CPU keeps any row in cache, CUDA up to its register limit (the C++ constant), Triton a
    power-of-two tile of its configured size."""
    assert REGISTRY["cpu"].fits_on_chip(1 << 22)
    assert REGISTRY["cuda"].fits_on_chip(native.CUDA_MAX_ON_CHIP_COLS)
    assert not REGISTRY["cuda"].fits_on_chip(native.CUDA_MAX_ON_CHIP_COLS + 1)
    pytest.importorskip("triton")
    from aepg_kernels.backends.triton.launch import CONFIG

    assert REGISTRY["triton"].fits_on_chip(CONFIG.max_one_tile_cols)
    assert not REGISTRY["triton"].fits_on_chip(CONFIG.max_one_tile_cols + 1)

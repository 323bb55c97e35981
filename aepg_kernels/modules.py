"""nn.Module wrappers of the functional API."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _row_terms
from ._contract import pack
from ._spec import (
    Options,
    check_chunk_size,
    check_coefficient_devices,
    check_coefficients,
    check_logit_transform,
    check_options,
    is_plain_call,
)
from ._torch_private import legacy_reduction
from .backends import resolve
from .backends.native import NativeBackend
from .functional import aepg_coefficients, run, run_linear
from .schedules import AlphaSchedule


class PolicyLoss(nn.Module):
    """The fused EPG-family loss as a module. With the defaults it is a drop-in for
    ``nn.CrossEntropyLoss`` (same positional arguments, same results); the family's terms
    are keyword arguments (see ``policy_loss``). The options are validated when the module is made
    and whenever one is assigned, not on every call."""

    _OPTION_ORDER = ("entropy_weight", "label_smoothing", "focal_gamma", "ignore_index", "reduction")
    _OPTIONS = frozenset(_OPTION_ORDER)
    # Declared for mypy, which types nn.Module attributes as `Tensor | Module` (__getattr__): the
    # class-weight buffer, and the validated options kept in __dict__ by _check_options.
    weight: Optional[Tensor]
    _options: Options

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        ce_weight=1.0,
        epg_weight=0.0,
        entropy_weight: float = 0.0,
        focal_gamma: float = 0.0,
        loss_value: str = "policy",
        backend: str = "auto",
    ):
        super().__init__()
        if size_average is not None or reduce is not None:  # the deprecated pair, as torch maps it
            reduction = legacy_reduction(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.ce_weight = ce_weight
        self.epg_weight = epg_weight
        self.entropy_weight = entropy_weight
        self.focal_gamma = focal_gamma
        self.backend = backend
        _row_terms.check(None, loss_value)
        self.loss_value = loss_value
        check_coefficients(ce_weight, epg_weight)
        self._check_options()

    def __setattr__(self, name: str, value) -> None:
        if "_options" in self.__dict__:
            if name in self._OPTIONS:
                self._check_options(**{name: value})  # before the assignment: a bad value changes nothing
            elif name == "loss_value":
                _row_terms.check(None, value)
            elif name in ("ce_weight", "epg_weight"):
                check_coefficients(**{"ce_weight": self.ce_weight, "epg_weight": self.epg_weight, name: value})
            elif name == "backend":
                self.__dict__["_eager"] = None
        super().__setattr__(name, value)

    def _check_options(self, **new) -> None:
        options = {name: new[name] if name in new else getattr(self, name) for name in self._OPTION_ORDER}
        self.__dict__["_options"] = check_options(**options)
        self.__dict__["_eager"] = None

    def _coefficients(self):
        return self.ce_weight, self.epg_weight

    def _eager_call(self, device: torch.device):
        """(the backend's loss, the op's hyperparameter arguments for a call without stats (see
        _contract.pack), whether the backend's operator checks the call itself) for an eager call
        on `device`; made again only when the coefficients, the options, the backend or the
        device change."""
        a, b = self._coefficients()
        cached = self.__dict__["_eager"]
        if cached is not None and _same(cached[0], a) and _same(cached[1], b) and cached[2] == device:
            return cached[3]
        # arg-type: mypy maps the second star-tuple onto pack's parameters wrongly (it fits them)
        packed = pack(*check_coefficients(a, b), *self._options, False, False)  # type: ignore[arg-type]
        check_coefficient_devices(packed[0], packed[1], device)
        backend = resolve(self.backend, device)
        call = (backend.loss, packed, isinstance(backend, NativeBackend))
        self.__dict__["_eager"] = (a, b, device, call)
        return call

    def forward(self, input: Tensor, target: Tensor, return_stats: bool = False, token_weight: Optional[Tensor] = None):
        """The loss of logits `input` for `target`; `token_weight` as in ``policy_loss``."""
        if token_weight is not None or self.loss_value != "policy":
            terms = _row_terms.check(token_weight, self.loss_value)
            ce_weight, epg_weight = self._coefficients()
            return run(
                input, target, self.weight, ce_weight, epg_weight, self._options, self.backend, return_stats, terms
            )
        if (
            not return_stats
            and self._buffers["weight"] is None
            and input.__class__ is Tensor
            and target.__class__ is Tensor
            and input.dim() == 2
            and target.dim() == 1
        ):
            # The common call in as few Python steps as possible: at classification shapes host
            # time is most of its cost (benchmarks/README.md, "CPU, per call, as a drop-in").
            if not torch.compiler.is_compiling():
                loss, packed, checks_call = self._eager_call(input.device)
                if checks_call:  # the native operator checks dtypes, shapes and devices itself
                    try:
                        return loss(input, target, None, *packed)[0]
                    except RuntimeError:
                        pass  # a call it refuses: the validating way below raises the typed error
                elif is_plain_call(input, target):
                    return loss(input, target, None, *packed)[0]
            elif is_plain_call(input, target):  # packed once per graph, no cache to guard on
                # arg-type: as in _eager_call, a mypy limitation with two star-tuples
                packed = pack(*check_coefficients(*self._coefficients()), *self._options, False, False)  # type: ignore[arg-type]
                check_coefficient_devices(packed[0], packed[1], input.device)
                return resolve(self.backend, input.device).loss(input, target, None, *packed)[0]
        ce_weight, epg_weight = self._coefficients()
        return run(input, target, self.weight, ce_weight, epg_weight, self._options, self.backend, return_stats)

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, epg_weight={self.epg_weight}, entropy_weight={self.entropy_weight}, "
            f"label_smoothing={self.label_smoothing}, focal_gamma={self.focal_gamma}, "
            f"loss_value={self.loss_value!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


def _same(cached, value) -> bool:
    """Whether a coefficient is the one packed: the same tensor (updated in place, as a schedule's
    alpha is), or an equal float."""
    return cached is value or (cached.__class__ is float and value.__class__ is float and cached == value)


class AEPGLoss(PolicyLoss):
    """aEPG with alpha read from `schedule.alpha` on every call; the caller steps the schedule
    (once per optimizer step) and resets it at each task boundary."""

    def __init__(self, schedule: AlphaSchedule, **kwargs):
        if not isinstance(schedule, AlphaSchedule):
            raise TypeError(f"schedule must be an AlphaSchedule (e.g. SigmoidAnneal), got {type(schedule).__name__}")
        fixed = sorted({"ce_weight", "epg_weight"} & kwargs.keys())
        if fixed:
            raise TypeError(
                f"AEPGLoss sets ce_weight = alpha and epg_weight = 1 - alpha from the schedule; "
                f"do not pass {', '.join(fixed)}"
            )
        super().__init__(**kwargs)
        self.schedule = schedule

    def _coefficients(self):
        return aepg_coefficients(self.schedule.alpha)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, " + super().extra_repr()


class LinearPolicyLoss(PolicyLoss):
    """``linear_policy_loss`` as a criterion: called with the hidden states, the output layer's
    weight (and bias) and the targets, so that the head stays the model's own parameter (tied
    embeddings, optimizers and sharding see it as usual). Options as ``PolicyLoss``, plus
    `chunk_size`."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        chunk_size: Optional[int] = None,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(
            weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, **kwargs
        )
        self.chunk_size = check_chunk_size(chunk_size)
        check_logit_transform(logit_scale, softcap)
        self.logit_scale, self.softcap = logit_scale, softcap

    def forward(  # type: ignore[override]  # a criterion of hidden states and the head, not of logits
        self,
        input: Tensor,
        linear_weight: Tensor,
        target: Tensor,
        linear_bias: Optional[Tensor] = None,
        return_stats: bool = False,
        token_weight: Optional[Tensor] = None,
    ):
        ce_weight, epg_weight = self._coefficients()
        return run_linear(
            input,
            linear_weight,
            linear_bias,
            target,
            self.weight,
            ce_weight,
            epg_weight,
            self._options,
            check_chunk_size(self.chunk_size),
            self.backend,
            return_stats,
            _row_terms.check(token_weight, self.loss_value),
            check_logit_transform(self.logit_scale, self.softcap),
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", chunk_size={self.chunk_size}, logit_scale={self.logit_scale}, "
            f"softcap={self.softcap}"
        )

"""Hugging Face transformers: the policy-gradient family as the training loss of a decoder-only
``*ForCausalLM``, computed from its last hidden states by ``linear_policy_loss``, so that the
(B, S, V) logits are never materialised (docs/integrations.md).

``patch_causal_lm(model, loss="dft")`` swaps two forwards on the instance (the classes are
untouched): the model's, and its LM head's. With labels, the patched forward runs the original one
with ``labels=None``; the head hands the hidden states over instead of computing logits, and the
loss comes from them, the labels shifted as transformers shifts them. Everything else (the cache,
attention masks, the MoE router's auxiliary loss, the outputs) stays the model's own.

Needs the optional extra ``[llm]`` (transformers >= 5).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aepg_kernels as ak

try:
    from transformers import TrainerCallback
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "aepg_kernels.integrations.transformers needs transformers>=5: pip install 'aepg-kernels[llm]'"
    ) from error

IGNORE_INDEX = -100  # transformers' label padding


# --- what the patch supports, as data ------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """How an architecture turns its LM head's output into logits, as config attributes:
    logits = softcap tanh(scale * head(h) / softcap), scale = config.<scale> / config.<inverse_scale>."""

    softcap: Optional[str] = None
    scale: Optional[str] = None
    inverse_scale: Optional[str] = None

    def of(self, config) -> Tuple[float, Optional[float]]:
        """(logit_scale, softcap) of a model's config, as ``linear_policy_loss`` takes them."""
        scale = 1.0
        if self.scale is not None:
            scale *= float(getattr(config, self.scale))
        if self.inverse_scale is not None:
            scale /= float(getattr(config, self.inverse_scale))
        softcap = None if self.softcap is None else getattr(config, self.softcap, None)
        return scale, None if softcap is None else float(softcap)


# The architectures whose *ForCausalLM forward is checked to be: base model, slice_logits_to_keep,
# lm_head, the transform below, loss_function (and the router's auxiliary loss for the MoE ones).
ARCHITECTURES: Dict[str, LogitTransform] = {
    "llama": LogitTransform(),
    "mistral": LogitTransform(),
    "qwen2": LogitTransform(),
    "qwen3": LogitTransform(),
    "phi3": LogitTransform(),
    "gemma": LogitTransform(),
    "gemma2": LogitTransform(softcap="final_logit_softcapping"),
    "gemma3_text": LogitTransform(softcap="final_logit_softcapping"),
    "mixtral": LogitTransform(),
    "qwen3_moe": LogitTransform(),
    "cohere": LogitTransform(scale="logit_scale"),
    "granite": LogitTransform(inverse_scale="logits_scaling"),
}

# loss name -> the coefficients it fixes; "aepg" takes alpha from a schedule (or `alpha=`) at every
# call, "policy" takes ce_weight / epg_weight from the keyword arguments.
LOSSES: Dict[str, dict] = {
    "ce": {"ce_weight": 1.0, "epg_weight": 0.0},
    "epg": {"ce_weight": 0.0, "epg_weight": 1.0},
    "dft": {"ce_weight": 0.0, "epg_weight": 1.0, "loss_value": "dft"},
    "aepg": {},
    "policy": {},
}
_COEFFICIENTS = ("ce_weight", "epg_weight")
# linear_policy_loss's keyword options less those the patch sets itself (from the model, the labels
# and the Trainer): the options a loss takes, read from the op's signature
_SET_BY_PATCH = {
    "linear_bias",
    "weight",
    "ignore_index",
    "reduction",
    "token_weight",
    "logit_scale",
    "softcap",
    "return_stats",
    *_COEFFICIENTS,
}
OPTIONS = tuple(
    name
    for name, p in inspect.signature(ak.linear_policy_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in _SET_BY_PATCH
)

LOGITS_MODES = ("never", "eval", "always")  # when the patched forward also returns the logits


class Objective:
    """A loss of the family with its options, validated once; `kwargs()` gives the keyword
    arguments of one call (alpha read from the schedule at that moment)."""

    def __init__(self, loss: str, schedule=None, alpha=None, ignore_index: int = IGNORE_INDEX, **options):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
        allowed = OPTIONS + (_COEFFICIENTS if loss == "policy" else ())
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"loss={loss!r} takes the options {', '.join(allowed)}; got {', '.join(unknown)}")
        clashes = sorted(name for name in set(options) & set(LOSSES[loss]) if options[name] != LOSSES[loss][name])
        if clashes:
            raise ValueError(
                f"loss={loss!r} sets {', '.join(f'{n}={LOSSES[loss][n]!r}' for n in clashes)}; "
                f'use loss="policy" for other values'
            )
        if loss == "aepg":
            if (schedule is None) == (alpha is None):
                raise ValueError('loss="aepg" needs exactly one of schedule= (an AlphaSchedule) or alpha= (a float)')
            if schedule is not None and not isinstance(schedule, ak.AlphaSchedule):
                raise TypeError(f"schedule must be an aepg_kernels.AlphaSchedule, got {type(schedule).__name__}")
        elif schedule is not None or alpha is not None:
            raise ValueError(f'schedule= and alpha= belong to loss="aepg", not loss={loss!r}')
        self.name, self.schedule, self.alpha = loss, schedule, alpha
        self.ignore_index = ignore_index
        self.options = {**LOSSES[loss], **options}

    def kwargs(self) -> dict:
        kwargs = dict(self.options, ignore_index=self.ignore_index)
        if self.name == "aepg":
            alpha = self.schedule.alpha if self.schedule is not None else self.alpha
            kwargs.update(ce_weight=alpha, epg_weight=1 - alpha)
        return kwargs

    def check(self, linear_weight: Tensor) -> None:
        """Runs one row through the op, so that a bad option fails now with the op's own message."""
        with torch.no_grad():
            w = linear_weight.detach()
            ak.linear_policy_loss(
                w.new_zeros((1, w.shape[1])), w, torch.zeros(1, dtype=torch.long, device=w.device), **self.kwargs()
            )

    def __repr__(self) -> str:
        return f"Objective({self.name!r}, {self.options})"


def shifted_labels(labels: Tensor, shift_labels: Optional[Tensor] = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The next-token targets of every position, as transformers' ForCausalLMLoss makes them:
    `shift_labels` when given, else labels[..., 1:] padded at the end with ignore_index."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _divided(loss: Tensor, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# --- the patch -------------------------------------------------------------------------------------

_OFF, _HAND_OVER, _KEEP = "off", "hand over", "keep"  # what the head does with its input


class CausalLMPatch:
    """The state of a patched model: its loss, the forwards to restore and the running statistics
    of the counted tokens (entropy, p_y, accuracy) per mode, read and reset by `pop_stats`.

    The model and its head are given bound forwards that find this patch through the module
    (`module._aepg_patch`), so that a deep copy of a patched model (a reference or EMA model) is a
    patched copy, with its own patch, calling its own originals."""

    def __init__(self, model: nn.Module, head: nn.Linear, objective: Objective, logits: str, track_stats: bool):
        self.model, self.head, self.objective = model, head, objective
        self.logits = logits
        self.track_stats = track_stats
        self.logit_scale, self.softcap = ARCHITECTURES[model.config.model_type].of(model.config)
        self._capture, self._hidden = _OFF, None
        self._totals: Dict[str, Tensor] = {}  # "train" / "eval" -> tokens, entropy, p_y, correct: summed, on device
        self.calls = 0  # forwards with labels: a trainer that computes its own loss leaves it at 0
        # the forwards in effect before (bound methods, or instance attributes such as TRL's or accelerate's)
        self.original_forward, self.original_head_forward = model.forward, head.forward
        self.model_had_own_forward, self.head_had_own_forward = "forward" in vars(model), "forward" in vars(head)
        self._signature = inspect.signature(self.original_forward)
        self._var_keyword = next((p.name for p in self._signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def install(self) -> None:
        for module, forward, original in (
            (self.model, _patched_model_forward, self.original_forward),
            (self.head, _patched_head_forward, self.original_head_forward),
        ):
            module._aepg_patch = self
            # a partial of the module: deepcopy and pickle rebind it to the copy
            module.forward = functools.partial(forward, module)
            module.forward.__signature__ = inspect.signature(original)  # the Trainer reads the input names

    def uninstall(self) -> None:
        for module, had_own, original in (
            (self.model, self.model_had_own_forward, self.original_forward),
            (self.head, self.head_had_own_forward, self.original_head_forward),
        ):
            if had_own:
                module.forward = original
            else:
                del module.forward
            del module._aepg_patch

    def head_forward(self, hidden_states: Tensor) -> Tensor:
        """The head while patched: the logits as before, or the hidden states handed over."""
        if self._capture is _OFF:
            return self.original_head_forward(hidden_states)
        self._hidden = hidden_states
        if self._capture is _KEEP:
            return self.original_head_forward(hidden_states)
        return hidden_states.new_empty((*hidden_states.shape[:-1], 0))  # the forward's logit ops run on nothing

    def forward(self, *args, **kwargs):
        """The model while patched: with labels, the original forward without them and the loss
        from the hidden states; without labels, the original forward."""
        arguments = self._signature.bind(*args, **kwargs).arguments
        arguments.update(arguments.pop(self._var_keyword, {}))
        if arguments.pop("fused_lm_head", False):
            raise TypeError(
                "fused_lm_head=True asks for TRL's own fused LM head and loss, which would replace "
                "the patched loss: train with aepg_kernels.integrations.trl.PolicySFTTrainer"
            )
        labels = arguments.pop("labels", None)
        if labels is None:
            return self.original_forward(*args, **kwargs)
        self.calls += 1
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        out = self._forward_with_loss(arguments, labels)
        if return_dict:
            return out
        values = out.to_tuple()  # which drops None: keep the logits' place, as the model's tuple has it
        return values if out.logits is not None else values[:1] + (None,) + values[1:]

    def _forward_with_loss(self, arguments: dict, labels: Tensor):
        keep = self.logits == "always" or (self.logits == "eval" and not self.model.training)
        self._capture = _KEEP if keep else _HAND_OVER
        try:
            out = self.original_forward(**arguments, labels=None, return_dict=True)
            hidden = self._hidden
        finally:
            self._capture, self._hidden = _OFF, None
        if hidden is None:
            raise RuntimeError(
                f"{type(self.model).__name__}'s forward did not call its output embedding "
                "(get_output_embeddings()): this model cannot be patched"
            )
        loss = self.loss(
            hidden,
            labels,
            arguments.get("shift_labels"),
            arguments.get("num_items_in_batch"),
            arguments.get("logits_to_keep", 0),
        )
        aux_loss = out.get("aux_loss")
        if aux_loss is not None:  # MoE: the router's load-balancing loss, as the original adds it
            loss = loss + self.model.router_aux_loss_coef * aux_loss.to(loss.device)
        fields = {key: value for key, value in out.items() if key not in ("loss", "logits")}
        return type(out)(loss=loss, logits=out["logits"] if keep else None, **fields)

    def loss(
        self,
        hidden: Tensor,
        labels: Tensor,
        shift_labels: Optional[Tensor] = None,
        num_items_in_batch=None,
        logits_to_keep=0,
    ) -> Tensor:
        """The loss of the hidden states that feed the head (already sliced by logits_to_keep)
        for the labels of the whole sequence: sum / num_items_in_batch when given (gradient
        accumulation), else the mean over the counted tokens."""
        target = shifted_labels(labels, shift_labels, self.objective.ignore_index).to(hidden.device)
        target = slice_logits_to_keep(target.unsqueeze(-1), logits_to_keep).squeeze(-1)
        if target.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels give targets of shape {tuple(target.shape)} for hidden states of shape "
                f"{tuple(hidden.shape[:-1])}: pass labels (or shift_labels) shaped like input_ids"
            )
        out = ak.linear_policy_loss(
            hidden,
            self.head.weight,
            target,
            linear_bias=self.head.bias,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            reduction="mean" if num_items_in_batch is None else "sum",
            return_stats=self.track_stats,
            **self.objective.kwargs(),
        )
        if self.track_stats:
            out, stats = out
            self._add_stats(stats, target != self.objective.ignore_index)
        return _divided(out, num_items_in_batch)

    def _add_stats(self, stats: ak.LossStats, counted: Tensor) -> None:
        """Adds the counted tokens' sums to the totals of the model's mode (no host read)."""
        with torch.no_grad():
            counted = counted.reshape(-1)
            rows = torch.stack(
                [counted, stats.entropy.reshape(-1), stats.p_target.reshape(-1), stats.target_is_argmax().reshape(-1)]
            ).double()
            sums = torch.where(counted, rows, 0.0).sum(1)  # the entropy of an ignored row is not 0
            mode = "train" if self.model.training else "eval"
            totals = self._totals.get(mode)
            self._totals[mode] = sums if totals is None else totals.add_(sums)

    def pop_totals(self, mode: str = "train") -> Optional[Tensor]:
        """The summed (tokens, entropy, p_y, correct) of the counted tokens of `mode` ("train" or
        "eval") since the last pop, as a float64 tensor on the device, then resets; None if none."""
        return self._totals.pop(mode, None)

    def pop_stats(self, mode: str = "train") -> Dict[str, float]:
        """The means over the counted tokens of `mode` since the last pop (one device read), then
        resets: entropy, mean_p_target, mean_token_accuracy; {} when no token was seen."""
        return token_means(self.pop_totals(mode))


STAT_NAMES = ("entropy", "mean_p_target", "mean_token_accuracy")  # the means of CausalLMPatch's totals


def token_means(totals: Optional[Tensor]) -> Dict[str, float]:
    """{entropy, mean_p_target, mean_token_accuracy} of summed (tokens, entropy, p_y, correct)
    totals, or of several ranks' totals stacked (..., 4); {} without a token."""
    if totals is None:
        return {}
    tokens, *sums = totals.reshape(-1, 4).sum(0).tolist()
    return {} if tokens == 0 else {name: value / tokens for name, value in zip(STAT_NAMES, sums)}


def _patched_model_forward(model: nn.Module, *args, **kwargs):
    return model._aepg_patch.forward(*args, **kwargs)


def _patched_head_forward(head: nn.Module, hidden_states: Tensor) -> Tensor:
    return head._aepg_patch.head_forward(hidden_states)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the patch goes on it), else the model."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _check_patchable(model: nn.Module) -> nn.Linear:
    """The model's LM head, after refusing what the patch cannot honour."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"patch_causal_lm needs a transformers *ForCausalLM model, got {type(model).__name__}")
    name, model_type = type(model).__name__, getattr(config, "model_type", None)
    if not name.endswith("ForCausalLM") or model_type not in ARCHITECTURES:
        raise ValueError(
            f"patch_causal_lm supports the *ForCausalLM models of {', '.join(sorted(ARCHITECTURES))}; "
            f"got {name} (model_type {model_type!r})"
        )
    if getattr(model, "_aepg_patch", None) is not None:
        raise ValueError(f"this {name} is patched already: call unpatch_causal_lm(model) first")
    if "_loss_function" in vars(model) or getattr(config, "loss_type", None) not in (None, "ForCausalLM"):
        raise ValueError(
            f"this {name} has its own loss function (model.loss_function or config.loss_type="
            f"{getattr(config, 'loss_type', None)!r}), which the patch would replace"
        )
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            f"the LM head of this {name} is a {type(head).__name__}, not a plain nn.Linear (a PEFT "
            "adapter or modules_to_save wrapper, or a quantised layer): the fused loss reads its weight "
            "directly; keep the LM head out of the adapter's target_modules and modules_to_save"
        )
    if head.weight.shape[0] != config.vocab_size:
        raise ValueError(f"the LM head has {head.weight.shape[0]} rows but config.vocab_size is {config.vocab_size}")
    return head


def patch_causal_lm(
    model: nn.Module,
    loss: str = "dft",
    *,
    schedule=None,
    alpha=None,
    logits: str = "never",
    track_stats: bool = False,
    ignore_index: int = IGNORE_INDEX,
    **options,
) -> CausalLMPatch:
    """Makes a transformers ``*ForCausalLM`` (or a PEFT model around one) compute its loss with the
    fused linear policy loss from the hidden states, never materialising the logits in training.

    Args:
        model: a causal LM of an architecture in ``ARCHITECTURES``; a PEFT model is patched inside.
        loss: "dft" (TRL's DFT: EPG's gradient, -sg(p_y) log p_y as the value), "ce", "epg",
            "aepg" (alpha CE + (1 - alpha) EPG; alpha from ``schedule`` or ``alpha``) or "policy"
            (``ce_weight`` / ``epg_weight`` from the options).
        logits: when a forward with labels also returns the logits: "never" (the loss only, also in
            evaluation), "eval" (in eval mode, for a compute_metrics that needs them; they are then
            materialised) or "always".
        track_stats: accumulate the counted tokens' entropy, p_y and accuracy, per mode (train /
            eval), for ``pop_stats`` (``AlphaScheduleCallback`` and ``PolicySFTTrainer`` turn it on).
        options: entropy_weight, label_smoothing, focal_gamma, loss_value, backend, chunk_size, as
            in ``linear_policy_loss``.

    Returns the patch (``pop_stats``, ``objective``); ``unpatch_causal_lm`` restores the model.
    """
    model = _base_model(model)
    head = _check_patchable(model)
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits must be one of {', '.join(map(repr, LOGITS_MODES))}, got {logits!r}")
    objective = Objective(loss, schedule, alpha, ignore_index, **options)
    objective.check(head.weight)
    patch = CausalLMPatch(model, head, objective, logits, track_stats)
    patch.install()
    return patch


def unpatch_causal_lm(model: nn.Module) -> None:
    """Restores the forwards that `patch_causal_lm` swapped."""
    model = _base_model(model)
    patch = getattr(model, "_aepg_patch", None)
    if patch is None:
        raise ValueError(f"this {type(model).__name__} is not patched")
    patch.uninstall()


def get_patch(model: nn.Module) -> Optional[CausalLMPatch]:
    """The patch of a patched model (or of the model inside a PEFT wrapper), else None."""
    return getattr(_base_model(model), "_aepg_patch", None)


# --- for users who keep the logits -----------------------------------------------------------------


class ForCausalLMPolicyLoss:
    """A transformers ``loss_function`` (the signature of its ForCausalLMLoss) that computes a loss
    of the family from the logits: ``model.loss_function = ForCausalLMPolicyLoss("dft")``. The
    logits are materialised as usual; ``patch_causal_lm`` avoids them."""

    def __init__(self, loss: str = "dft", *, schedule=None, alpha=None, **options):
        if "chunk_size" in options:
            raise TypeError("chunk_size belongs to the fused linear loss (patch_causal_lm), not to a loss of logits")
        self.objective = Objective(loss, schedule, alpha, **options)

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int,
        num_items_in_batch=None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: Optional[Tensor] = None,
        **kwargs,
    ) -> Tensor:
        kwargs = dict(self.objective.kwargs(), ignore_index=ignore_index)
        target = shifted_labels(labels, shift_labels, ignore_index).reshape(-1).to(logits.device)
        loss = ak.policy_loss(
            logits.reshape(-1, vocab_size), target, reduction="mean" if num_items_in_batch is None else "sum", **kwargs
        )
        return _divided(loss, num_items_in_batch)


# --- the Trainer callback ----------------------------------------------------------------------------


class AlphaScheduleCallback(TrainerCallback):
    """Steps an aEPG schedule once per optimizer step (never per micro-batch), resets it every
    `task_steps` steps when given, and adds alpha and the patched loss's token statistics
    (entropy, mean_p_target, mean_token_accuracy: free from the kernel's stats) to the logs.

    Either part is optional: `schedule=None` only logs the statistics, `patch=None` only steps.
    With `task_steps`, the schedule's total_steps becomes task_steps. Add it with `attach(trainer)`,
    which puts it before the reporting callbacks (TensorBoard, W&B, ...), so that they log its
    values too; `Trainer(callbacks=[...])` puts it after them."""

    def __init__(
        self,
        schedule: Optional[ak.AlphaSchedule] = None,
        patch: Optional[CausalLMPatch] = None,
        *,
        task_steps: Optional[int] = None,
    ):
        if schedule is None and patch is None:
            raise ValueError("AlphaScheduleCallback needs a schedule, a patch, or both")
        if task_steps is not None and (
            isinstance(task_steps, bool) or not isinstance(task_steps, int) or task_steps < 1
        ):
            raise ValueError(f"task_steps must be an int >= 1 or None, got {task_steps!r}")
        self.schedule, self.patch, self.task_steps = schedule, patch, task_steps

    def attach(self, trainer) -> "AlphaScheduleCallback":
        """Adds this callback to a Trainer ahead of the others (so its values reach the reporters)."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "label_smoothing_factor", 0.0):
            raise ValueError(
                "TrainingArguments.label_smoothing_factor makes the Trainer compute its own loss from "
                "the logits; pass label_smoothing= to patch_causal_lm instead"
            )
        if self.patch is not None:
            self.patch.track_stats = True
        if self.schedule is not None:  # resuming: the schedule where this step of its task has it
            total = self.task_steps or self.schedule.total_steps
            steps = state.global_step % self.task_steps if self.task_steps else min(state.global_step, total)
            self.schedule.load_state_dict({**self.schedule.state_dict(), "step": steps, "total_steps": total})

    def on_step_end(self, args, state, control, **kwargs):
        if self.schedule is None:
            return
        if self.task_steps and state.global_step % self.task_steps == 0:
            self.schedule.reset()
        else:
            self.schedule.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.patch is not None and self.patch.calls == 0:
            raise RuntimeError(
                "the trainer trained without calling the patched forward with labels, so the loss "
                "was not the patched one (TRL's SFTTrainer computes its own: use PolicySFTTrainer)"
            )
        metrics = {} if self.schedule is None else {"alpha": float(self.schedule.alpha)}
        if self.patch is not None:
            metrics.update(self.patch.pop_stats("train"))
        _add_to_logs(state, logs, metrics)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.patch is not None:
            stats = self.patch.pop_stats("eval")
            _add_to_logs(state, metrics, {f"eval_{name}": value for name, value in stats.items()})


def _add_to_logs(state, logs: Optional[dict], metrics: dict) -> None:
    """Adds metrics to the dict the callbacks pass on and to the log history, where the Trainer
    copied the logs before calling the callbacks."""
    if logs is not None:
        logs.update(metrics)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)

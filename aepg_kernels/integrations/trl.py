"""TRL: ``PolicySFTTrainer``, an ``SFTTrainer`` that optimises the loss of a model patched by
``patch_causal_lm`` (DFT, aEPG, entropy terms) instead of its own (docs/integrations.md).

TRL's SFTTrainer (1.16) installs its own fused LM head on the model and, in ``compute_loss``, calls
the model with ``fused_lm_head=True``, which bypasses any other forward and computes TRL's NLL or
DFT. This subclass overrides ``compute_loss`` only: it calls the (patched) model with the labels
and ``num_items_in_batch``, so TRL's head passes the call through to the patch, and logs TRL's
metrics (entropy, mean_token_accuracy, num_tokens) from the kernel's statistics. Options that
would make TRL compute another loss are refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from .transformers import STAT_NAMES, get_patch, patch_causal_lm, token_means

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("aepg_kernels.integrations.trl needs trl>=1.16: pip install 'aepg-kernels[llm]'") from error


class PolicySFTTrainer(SFTTrainer):
    """``SFTTrainer`` with the loss of ``patch_causal_lm``.

    Args:
        policy: the patch's arguments (``dict(loss="dft", ...)``, or a loss name) to patch the model
            here; None when the model (or the model inside a PEFT wrapper) is patched already.
        The other arguments are SFTTrainer's. ``SFTConfig.loss_type`` must stay "nll" (the patch
        says which loss), and ``compute_loss_func`` / ``label_smoothing_factor`` are refused: with
        them TRL computes its own loss from the logits.
    """

    def __init__(self, *args, policy=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll":
            raise ValueError(
                f"SFTConfig.loss_type={self.args.loss_type!r} selects TRL's own loss; with "
                "PolicySFTTrainer the patch chooses the loss: patch_causal_lm(model, loss=...)"
            )
        if self.compute_loss_func is not None or self.args.label_smoothing_factor:
            raise ValueError(
                "compute_loss_func and label_smoothing_factor make TRL compute its own loss from the "
                "logits; pass the loss (and label_smoothing=) to patch_causal_lm instead"
            )
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and parallelism.sp_backend == "deepspeed" and parallelism.sp_enabled:
            raise ValueError("PolicySFTTrainer does not support DeepSpeed sequence parallelism")
        if policy is not None:
            policy = {"loss": policy} if isinstance(policy, str) else dict(policy)
            patch_causal_lm(self.model, **policy)
        self.patch = get_patch(self.model)
        if self.patch is None:
            raise ValueError("PolicySFTTrainer needs a model patched by patch_causal_lm, or policy=dict(loss=...)")
        self.patch.track_stats = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs, **loss_kwargs)
        loss, aux_loss = outputs["loss"], outputs.get("aux_loss")
        if aux_loss is not None:  # the model added coef * aux: scaled apart below, as TRL scales it
            aux_loss = self.patch.model.router_aux_loss_coef * aux_loss.to(loss.device)
            loss = loss - aux_loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages: as TRL's
        if aux_loss is not None:  # a per-micro-batch mean: averaged over the accumulation steps
            loss = loss + aux_loss / (self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1)
        self._log_token_stats(mode, inputs)
        return (loss, outputs) if return_outputs else loss

    def _log_token_stats(self, mode: str, inputs) -> None:
        totals: Optional[torch.Tensor] = self.patch.pop_totals(mode)
        if totals is not None:
            means = token_means(self.accelerator.gather_for_metrics(totals))
            for name in STAT_NAMES:
                self._metrics[mode][name].append(means.get(name, 0.0))
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:  # padding-free batches: one packed row
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            else:
                raise ValueError(
                    "PolicySFTTrainer counts tokens from attention_mask or position_ids; the batch has "
                    f"neither (keys: {', '.join(sorted(inputs))})"
                )
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

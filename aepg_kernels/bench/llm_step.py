"""`aepg-bench --suite llm-step`: one training step (forward + backward, no optimizer step) of a
Llama-architecture ``LlamaForCausalLM`` (random init, fp32), side by side in one interleaved run:

- transformers: ``model(input_ids, labels=labels).loss``, its own ForCausalLMLoss on the (B, S, V) logits;
- trl-nll, trl-dft: TRL's fused LM head as its SFTTrainer computes ``loss_type="nll"`` / ``"dft"``:
  ``add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))`` on a copy of the model,
  ``model(..., fused_lm_head=True)``, then ``-log_probs`` (times ``exp(log_probs).detach()`` for DFT)
  summed over ``label_mask.sum().clamp(min=1)``;
- aepg-ce, aepg-dft, aepg-aepg: ours, ``patch_causal_lm(model, "ce" | "dft" | "aepg", alpha=0.5)``
  on a copy of the model, then ``model(input_ids, labels=labels).loss`` (logits None in training).

Every model holds the same weights (copies of one random init). Labels are the input ids with the
first PROMPT_FRACTION of each row set to -100 (a prompt mask, as SFT makes them).

Per case each row's first call at the shape (after one at a tiny shape: lazy initialisation) is its
memory measurement and its gate: the loss and the gradients of the LM head weight and of one
base-model parameter against the row's reference (transformers' loss for CE, TRL's DFT for ours,
the eager formulas on transformers' logits for TRL's DFT and our aEPG). A row whose gradients
fail gets no time; a loss value outside the tolerance is reported as failed, the row still timed
(the value does not enter the update). Then REPEATS interleaved rounds (the order rotating each
round); the median is reported. Peak extra memory: ``llm.peak_extra_bytes`` (the resident set
sampled by a thread on a CPU, the allocator's peak on a GPU), the step's fresh gradients included.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from aepg_kernels import utils

from . import llm, output
from .correctness import TOLERANCE, relative_error
from .sweeps import parse_dims
from .timing import synchronize

# (batch, seq, hidden, vocab): 2048 tokens through a Llama-3-sized vocabulary
SHAPES = ((4, 512, 256, 128256),)
LAYERS, HEADS = 2, 4  # intermediate size: INTERMEDIATE_FACTOR * hidden
INTERMEDIATE_FACTOR = 2
PROMPT_FRACTION = 0.25
ALPHA = 0.5
REPEATS = llm.REPEATS
REFERENCE_ROWS = 1  # sequences of the float64 check of transformers' fp32 loss (reference_check)
HEAD, BASE = "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"  # the gated gradients
GRADS = {"dW_head": HEAD, "dW_base": BASE}
TRANSFORMERS, TRL_DFT = "transformers", "trl-dft"
EAGER_DFT, EAGER_AEPG = "eager DFT on transformers' logits", "eager aEPG on transformers' logits"

Batch = Tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels)
StepFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, ids, labels) -> loss


@dataclasses.dataclass(frozen=True)
class StepCase:
    batch: int
    seq: int
    hidden: int
    vocab: int
    layers: int = LAYERS
    heads: int = HEADS

    @property
    def intermediate(self) -> int:
        return INTERMEDIATE_FACTOR * self.hidden

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.seq}x{self.hidden}x{self.vocab}"

    @property
    def label(self) -> str:
        return f"fp32 {self.shape} ({self.layers} layers)"


def cases(shapes: Sequence[Tuple[int, int, int, int]] = SHAPES) -> List[StepCase]:
    return [StepCase(*shape) for shape in shapes]


def parse_shapes(text: str) -> List[Tuple[int, int, int, int]]:
    """'4x512x256x128256,2x16x16x1000' -> [(4, 512, 256, 128256), (2, 16, 16, 1000)] (B x S x H x V)."""
    shapes = parse_dims(text, "BxSxHxV", "4x512x256x128256")
    for shape in shapes:
        if shape[2] % (2 * HEADS):
            raise ValueError(
                f"--shapes: the hidden size must be a multiple of {2 * HEADS} ({HEADS} heads of an even "
                f"size), got {'x'.join(map(str, shape))!r}"
            )
    return shapes


# --- the rows ---------------------------------------------------------------------------------------


def model_loss(model, input_ids, labels) -> torch.Tensor:
    """transformers' own call (and the patched models': the same call, the loss ours)."""
    return model(input_ids=input_ids, labels=labels).loss


def trl_loss(dft: bool) -> StepFn:
    """SFTTrainer.compute_loss of trl 1.16 for loss_type "dft" / "nll" (num_items_in_batch None)."""

    def loss(model, input_ids, labels):
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        per_token = -out.log_probs  # zero on ignored positions
        if dft:
            per_token = per_token * out.log_probs.exp().detach()
        return per_token.sum() / out.label_mask.sum().clamp(min=1)

    return loss


@dataclasses.dataclass(frozen=True)
class StepImpl:
    name: str
    loss: str  # ce | dft | aepg
    fn: StepFn
    reference: Optional[str]  # the row (or eager formula) its gate compares with; None: the CE reference itself
    patch: Optional[dict] = None  # patch_causal_lm's arguments (ours)
    trl: bool = False
    description: str = ""


IMPLS = (
    StepImpl(
        TRANSFORMERS,
        "ce",
        model_loss,
        None,
        description="model(input_ids, labels=labels).loss: (B, S, V) logits, ForCausalLMLoss",
    ),
    StepImpl(
        "trl-nll",
        "ce",
        trl_loss(False),
        TRANSFORMERS,
        trl=True,
        description="add_fused_lm_head + fused_lm_head=True, -log_probs summed / label_mask.sum()",
    ),
    StepImpl(
        TRL_DFT,
        "dft",
        trl_loss(True),
        EAGER_DFT,
        trl=True,
        description="add_fused_lm_head + fused_lm_head=True, -log_probs * exp(log_probs).detach() "
        "summed / label_mask.sum() (SFTTrainer loss_type='dft')",
    ),
    StepImpl(
        "aepg-ce",
        "ce",
        model_loss,
        TRANSFORMERS,
        patch={"loss": "ce"},
        description='patch_causal_lm(model, "ce"), model(input_ids, labels=labels).loss',
    ),
    StepImpl(
        "aepg-dft",
        "dft",
        model_loss,
        TRL_DFT,
        patch={"loss": "dft"},
        description='patch_causal_lm(model, "dft"), model(input_ids, labels=labels).loss',
    ),
    StepImpl(
        "aepg-aepg",
        "aepg",
        model_loss,
        EAGER_AEPG,
        patch={"loss": "aepg", "alpha": ALPHA},
        description=f'patch_causal_lm(model, "aepg", alpha={ALPHA:g}), model(input_ids, labels=labels).loss',
    ),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLS)


def unavailable(impl: StepImpl) -> str:
    """Why `impl` does not run here ('' when it does)."""
    module = "trl" if impl.trl else "transformers"
    try:
        __import__(module)
    except Exception as error:  # noqa: BLE001  (any import failure: not run, with the reason)
        return f"{module} does not import ({type(error).__name__})"
    return ""


# --- the model, the batch, one step -----------------------------------------------------------------


def build_model(case: StepCase, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A random-init LlamaForCausalLM (untied head, sdpa attention, no cache) in training mode; the
    LM head ~ N(0, LOGIT_SCALE^2 / H), so the logits after the final RMSNorm are ~ N(0, 3^2), as
    the llm suite's (a far-from-uniform softmax; the default init gives p ~ 1/V everywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.heads,
        max_position_embeddings=max(case.seq, 64),
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, llm.LOGIT_SCALE / case.hidden**0.5)
    return model.train()


def make_batch(batch: int, seq: int, vocab: int, device: torch.device, seed: int = 0) -> Batch:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, : math.ceil(PROMPT_FRACTION * seq)] = -100
    return input_ids, labels


def prepared(impl: StepImpl, base: torch.nn.Module, models: Dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The model `impl` runs: the base model (transformers), one copy with TRL's fused head (both
    TRL rows), a patched copy per row of ours."""
    if impl.trl:
        if "trl" not in models:
            from trl.trainer.utils import add_fused_lm_head

            models["trl"] = copy.deepcopy(base)
            add_fused_lm_head(models["trl"], outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
        return models["trl"]
    if impl.patch is None:
        return base
    from aepg_kernels.integrations.transformers import patch_causal_lm

    model = copy.deepcopy(base)
    patch_causal_lm(model, **impl.patch)
    return model


def call(fn: StepFn, model: torch.nn.Module, input_ids, labels) -> torch.Tensor:
    """One training step without the optimizer: fresh .grad (None, as optimizer.zero_grad() leaves
    them), the loss, backward."""
    model.zero_grad(set_to_none=True)
    loss = fn(model, input_ids, labels)
    loss.backward()
    return loss.detach()


def outputs(model: torch.nn.Module, loss: torch.Tensor) -> Dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {"loss": loss, **{key: params[name].grad.detach().clone() for key, name in GRADS.items()}}


# --- the references -----------------------------------------------------------------------------------


def eager_aepg(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = ALPHA, ignore_index: int = -100
) -> torch.Tensor:
    """alpha CE + (1 - alpha) EPG (1 - p_y), the masked mean over the counted tokens."""
    mask = target != ignore_index
    logp = logits.log_softmax(-1).gather(1, target.masked_fill(~mask, 0)[:, None]).squeeze(1)
    per_token = alpha * -logp + (1 - alpha) * (1 - logp.exp())
    return (per_token * mask).sum() / mask.sum()


EAGER_FORMULAS = {EAGER_DFT: llm.dft_loss, EAGER_AEPG: eager_aepg}


def logits_loss(formula: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> StepFn:
    """A loss written on transformers' logits (shifted as TRL shifts them: no label is padded)."""

    def loss(model, input_ids, labels):
        logits = model(input_ids=input_ids).logits[:, :-1]
        return formula(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    return loss


def float64_check(base: torch.nn.Module, batch: Batch, rows: int = REFERENCE_ROWS) -> dict:
    """transformers' fp32 loss and gradients against the same model in float64 on the first `rows`
    sequences: how far from exact an fp32 step at this V is (the noise floor under the gate)."""
    input_ids, labels = (t[:rows] for t in batch)
    fp32 = outputs(base, call(model_loss, base, input_ids, labels))
    wide = copy.deepcopy(base).double()
    fp64 = outputs(wide, call(model_loss, wide, input_ids, labels))
    del wide
    base.zero_grad(set_to_none=True)
    errs = {key: relative_error(fp32[key], fp64[key]) for key in fp32}
    return {"rows": rows, "errors": errs, "max_error": max(errs.values())}


def gate(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], reference: str) -> dict:
    """max |got - ref| / max |ref| of the loss and each gated gradient against `reference`'s."""
    errs = {key: relative_error(got[key], ref[key]) for key in ref}
    tolerance = TOLERANCE["fp32"]
    grads_passed = all(errs[key] <= tolerance for key in GRADS)
    return {
        "reference": reference,
        "errors": errs,
        "max_error": max(errs.values()),
        "tolerance": tolerance,
        "gradients_passed": grads_passed,
        "passed": grads_passed and errs["loss"] <= tolerance,
    }


# --- one case -------------------------------------------------------------------------------------------

TINY_BATCH = (1, 8)  # the lazy-initialisation call's batch x seq


def run_case(case: StepCase, impls: Sequence[StepImpl], device: torch.device, repeats: int = REPEATS) -> dict:
    """The record of one case: per row its status, gate, peak extra bytes and times. transformers
    runs first (its first call is the CE reference); an eager formula's reference is computed on
    the base model when a row needs it."""
    base = build_model(case, device)
    batch = make_batch(case.batch, case.seq, case.vocab, device)
    tiny = make_batch(*TINY_BATCH, case.vocab, device, seed=1)
    record = {
        **dataclasses.asdict(case),
        "intermediate": case.intermediate,
        "shape": case.shape,
        "tokens": case.batch * case.seq,
        "counted_tokens": int((batch[1][:, 1:] != -100).sum()),
        "reference_check": float64_check(base, batch),
        "impls": {},
    }
    models, refs, steps = {}, {}, {}
    for impl in sorted(impls, key=lambda impl: impl.name != TRANSFORMERS):
        row = record["impls"][impl.name] = {"loss": impl.loss}
        try:
            model = prepared(impl, base, models)
            call(impl.fn, model, *tiny)
            start = time.perf_counter()
            row["peak_extra_bytes"], loss = llm.peak_extra_bytes(
                lambda: call(impl.fn, model, *batch), device, *model.parameters()
            )
            row["first_call_s"] = time.perf_counter() - start
            got = outputs(model, loss)
        except Exception as error:  # noqa: BLE001  (a row that raises is recorded, not fatal)
            row.update(status="error", reason=f"{type(error).__name__}: {str(error)[:300]}")
            continue
        reference = impl.reference
        if reference == TRL_DFT and TRL_DFT not in refs:  # TRL not run or its gradients failed
            reference = EAGER_DFT
        if reference is not None and reference not in refs and reference not in EAGER_FORMULAS:
            row.update(status="not gated", reason=f"its reference, {reference}, did not run")
            continue
        if reference in EAGER_FORMULAS and reference not in refs:
            refs[reference] = outputs(base, call(logits_loss(EAGER_FORMULAS[reference]), base, *batch))
            base.zero_grad(set_to_none=True)
        if reference is None:
            refs[impl.name] = got
            row["gate"] = {
                "reference": "itself (vs float64: reference_check)",
                "errors": {},
                "passed": True,
                "gradients_passed": True,
                "max_error": record["reference_check"]["max_error"],
                "tolerance": TOLERANCE["fp32"],
            }
        else:
            row["gate"] = gate(got, refs[reference], reference)
        if not row["gate"]["gradients_passed"]:
            row.update(
                status="failed check",
                reason=f"gradient error {row['gate']['max_error']:.2e} > {row['gate']['tolerance']:.2g} vs {reference}",
            )
            continue
        if impl.name == TRL_DFT:
            refs[TRL_DFT] = got
        steps[impl.name] = timed_step(impl.fn, model, batch, device)
    for name, seconds in llm.interleaved(steps, repeats).items():
        record["impls"][name].update(
            status="ok", seconds=seconds, min_s=min(seconds), median_s=statistics.median(seconds)
        )
    add_ratios(record)
    return record


def timed_step(fn: StepFn, model, batch: Batch, device: torch.device) -> Callable[[], object]:
    def step():
        call(fn, model, *batch)
        synchronize(device)

    return step


RATIOS = {
    "time_vs_transformers": "median_s",
    "min_time_vs_transformers": "min_s",
    "memory_vs_transformers": "peak_extra_bytes",
}


def add_ratios(record: dict) -> None:
    """Each timed row's median and min time and peak extra memory over transformers' (None where
    either is missing)."""
    base = record["impls"].get(TRANSFORMERS, {})
    for row in record["impls"].values():
        row["ratios"] = {}
        for key, quantity in RATIOS.items():
            ours, theirs = row.get(quantity), base.get(quantity)
            ok = row.get("status") == "ok" and base.get("status") == "ok"
            row["ratios"][key] = ours / theirs if ok and ours is not None and theirs else None


# --- tables, settings, the run --------------------------------------------------------------------------


def _number(value: Optional[float], digits: str) -> str:
    return "-" if value is None else format(value, digits)


def _gate_cell(row: dict) -> str:
    gate_row = row.get("gate")
    if gate_row is None:
        return "-"
    if not gate_row["errors"]:
        return f"reference (fp32 vs float64 {gate_row['max_error']:.0e})"
    errors = ", ".join(f"{key} {value:.0e}" for key, value in gate_row["errors"].items())
    return f"vs {gate_row['reference']}: {errors}" + ("" if gate_row["passed"] else " FAILED")


def markdown(records: Sequence[dict]) -> str:
    """One table: per case and row, the median (and min) seconds of a step and the peak extra
    memory (MiB), their ratios to transformers' own loss, and the gate's errors."""
    rows = []
    for r in records:
        for name, row in r["impls"].items():
            timed, ratios = row.get("status") == "ok", row.get("ratios", {})
            mib = row.get("peak_extra_bytes")
            rows.append(
                [
                    r["shape"],
                    name,
                    row.get("loss", "-"),
                    _number(row.get("median_s"), ".2f") if timed else f"{row.get('status')}",
                    _number(ratios.get("time_vs_transformers"), ".2f"),
                    _number(row.get("min_s"), ".2f"),
                    _number(ratios.get("min_time_vs_transformers"), ".2f"),
                    _number(None if mib is None else mib / 2**20, ".0f"),
                    _number(ratios.get("memory_vs_transformers"), ".2f"),
                    _gate_cell(row),
                ]
            )
    return utils.markdown_table(
        [
            "B x S x H x V",
            "implementation",
            "loss",
            "median s",
            "time / transformers",
            "min s",
            "min / transformers",
            "peak extra MiB",
            "memory / transformers",
            "gate (max relative error)",
        ],
        rows,
    )


def progress_line(record: dict) -> str:
    parts = []
    for name, row in record["impls"].items():
        if row.get("status") == "ok":
            mib = row.get("peak_extra_bytes")
            parts.append(f"{name} {row['median_s']:.3g} s" + ("" if mib is None else f" {mib / 2**20:.0f} MiB"))
        else:
            parts.append(f"{name} {row.get('status')}: {row.get('reason', '')[:80]}")
    return f"{record['label']}: " + ", ".join(parts)


def settings(device: torch.device, repeats: int) -> Dict[str, object]:
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "dtype": "fp32",
        "model": f"LlamaForCausalLM, random init (seed 0), {LAYERS} layers, {HEADS} heads (as many KV heads), "
        f"intermediate {INTERMEDIATE_FACTOR} x hidden, untied LM head ~ N(0, {llm.LOGIT_SCALE:g}^2/H), "
        "sdpa attention, use_cache False, training mode; every row on a copy of the same weights",
        "batch": f"input_ids uniform in [0, V); labels = input_ids with the first {PROMPT_FRACTION:g} of each row "
        "set to -100 (prompt mask); no attention mask",
        "call": "model.zero_grad(set_to_none=True); loss = <row>; loss.backward() (no optimizer step)",
        "implementations": {impl.name: impl.description for impl in IMPLS},
        "gate": (
            f"each row's first call at the shape: the loss and the gradients of {HEAD} (dW_head) and {BASE} "
            f"(dW_base) vs its reference, max |got - ref| / max |ref| <= {TOLERANCE['fp32']:g}: all in fp32, "
            "so they differ by summation order (chunked vs whole logits, another reduction tree), ~1e-6, "
            "far under the tolerance, while a wrong term or scale errs by 1e-1 or more. References: "
            f"transformers' loss for CE rows; {TRL_DFT} for aepg-dft; for {TRL_DFT} and aepg-aepg the eager "
            "formulas (llm.dft_loss, alpha CE + (1 - alpha)(1 - p_y)) on the base model's logits, shifted. "
            f"Gradients over the tolerance: no time; the loss alone over it: FAILED, still timed. "
            f"transformers' own fp32 step vs float64 on the first {REFERENCE_ROWS} sequence(s): "
            "reference_check"
        ),
        "timing": f"{repeats} interleaved rounds, order rotating, gc off; median and min reported (seconds in "
        "the JSON); before them a call at 1x8 (lazy initialisation) and the gated, memory-measured call",
        "memory": (
            "llm.peak_extra_bytes of the first call at the shape: "
            + (
                "torch.cuda.max_memory_allocated minus memory_allocated before it"
                if device.type == "cuda"
                else f"resident set sampled every {llm.SAMPLE_SECONDS * 1e3:g} ms by a thread, minus the resident set "
                "just before it (after gc.collect and malloc_trim)"
            )
            + "; includes the step's fresh gradients (released "
            "before the baseline); other rows' models and gradients are resident, not counted"
        ),
    }


def run(
    case_list: Sequence[StepCase],
    impls: Sequence[StepImpl],
    device: torch.device,
    repeats: int = REPEATS,
    budget_seconds: Optional[float] = None,
    case_done: Callable[[dict], None] = lambda record: None,
) -> List[dict]:
    """Every case in order; those that would start after `budget_seconds` are recorded as skipped."""
    start, records = time.monotonic(), []
    for case in case_list:
        if budget_seconds is not None and time.monotonic() - start > budget_seconds:
            why = f"time budget of {budget_seconds:.0f} s spent"
            record = {
                **dataclasses.asdict(case),
                "shape": case.shape,
                "impls": {impl.name: {"status": "skipped", "reason": why} for impl in impls},
            }
        else:
            record = run_case(case, impls, device, repeats)
        record["label"] = case.label
        records.append(record)
        case_done(record)
    return records


def ours_failed(records: Sequence[dict]) -> bool:
    """One of our rows raised, failed its gate or was not timed."""
    return any(
        name.startswith("aepg-") and (row.get("status") != "ok" or not row.get("gate", {}).get("passed"))
        for r in records
        for name, row in r["impls"].items()
        if row.get("status") != "skipped"
    )


def run_cli(parser, args, argv: Sequence[str], device: torch.device) -> int:
    """--suite llm-step: every case (llm_step.py), FILE.json rewritten after each, FILE.md (the table) at
    the end; 1 when one of our rows fails its gate or raises. transformers always runs (the baseline)."""
    from . import machine
    from .sweeps import check_names

    for name in ("losses", "no_graphs", "no_profile"):
        if getattr(args, name):
            parser.error(
                f"--{name.replace('_', '-')}: --suite llm-step has fixed rows "
                f"({', '.join(IMPL_NAMES)}; pick them with --implementations)"
            )
    if args.dtypes and args.dtypes != ["fp32"]:
        parser.error("--dtypes: --suite llm-step runs fp32 only")
    if args.modes and args.modes != ["fwd+bwd"]:
        parser.error("--modes: --suite llm-step times fwd+bwd only")
    for name in ("threads", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be > 0")
    try:
        names = check_names("implementations", args.implementations, IMPL_NAMES) if args.implementations else None
        case_list = cases(parse_shapes(args.shapes) if args.shapes else SHAPES)
    except ValueError as error:
        parser.error(str(error))
    if args.list:
        print("\n".join(case.label for case in case_list))
        return 0
    if unavailable(IMPLS[0]):
        parser.error(f"--suite llm-step needs transformers: {unavailable(IMPLS[0])}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wanted = [impl for impl in IMPLS if names is None or impl.name in names or impl.name == TRANSFORMERS]
    not_run = {impl.name: unavailable(impl) for impl in wanted if unavailable(impl)}
    impls = [impl for impl in wanted if impl.name not in not_run]
    info = machine.describe(device)
    info.update({name: utils.package_version(name) for name in ("transformers", "trl")})
    repeats = args.repeats or REPEATS
    print(
        f"aepg-bench --suite llm-step: {len(case_list)} cases on {machine.title(info)}, {repeats} repeats "
        "(median reported)"
    )
    for name, why in not_run.items():
        print(f"  not run: {name} ({why})")
    json_path = output.output_path(args.out, f"{output.device_tag(info)}-llm-step")
    document = {
        "suite": "llm-step",
        "argv": list(argv),
        "command": " ".join(["aepg-bench", *argv]),
        "complete": False,
        "machine": info,
        "settings": settings(device, repeats),
        "implementations": [impl.name for impl in impls],
        "not_run": not_run,
        "records": [],
    }

    def case_done(record):
        print(progress_line(record), flush=True)
        document["records"].append(record)
        output.write_json(json_path, document)

    start = time.monotonic()
    try:
        run(case_list, impls, device, repeats, args.max_seconds, case_done)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
        document["interrupted"] = "KeyboardInterrupt: the cases after the last record did not run"
    document["wall_seconds"] = time.monotonic() - start
    document["complete"] = not interrupted
    text = markdown(document["records"])
    print("\n" + text + "\n")
    output.write_json_and_markdown(document, json_path, text)
    if interrupted:
        return output.INTERRUPTED
    return int(ours_failed(document["records"]))

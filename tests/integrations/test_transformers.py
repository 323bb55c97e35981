"""patch_causal_lm, ForCausalLMPolicyLoss and AlphaScheduleCallback on tiny random models (CPU)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import aepg_kernels as ak  # noqa: E402
from aepg_kernels.integrations.transformers import (  # noqa: E402
    AlphaScheduleCallback,
    ForCausalLMPolicyLoss,
    get_patch,
    patch_causal_lm,
    unpatch_causal_lm,
)
from tests.integrations.tiny_lms import ARCHITECTURES, VOCAB, batch, grads, tiny_lm  # noqa: E402

# fp32 end to end: the fused op and F.cross_entropy differ by summation order only (a few ulps of
# the loss; gradients through two transformer layers stay within 1e-5 relative of the largest entry)
RTOL = 1e-5


def assert_grads_close(got: dict, want: dict, rtol: float = RTOL):
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = g.abs().max().clamp_min(1e-30)
        err = ((got[name] - g).abs().max() / scale).item()
        assert err <= rtol, f"{name}: relative error {err:.2e}"


def loss_and_grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, grads(model)


def trl_dft(logits, labels):
    """TRL SFTTrainer's loss_type="dft" (trl 1.16): -sg(p_y) log p_y summed over the counted
    next-token targets, divided by their number."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    counted = target != -100
    logp_y = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    per_token = torch.where(counted, -logp_y.exp().detach() * logp_y, 0.0)
    return per_token.sum() / counted.sum().clamp(min=1)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_patched_ce_equals_the_models_loss(model_type):
    """For every supported architecture (softcap, logit scale, tied embeddings, MoE aux loss):
    the patched CE equals the model's own loss and gradients, and returns no logits."""
    model = tiny_lm(model_type)
    input_ids, labels = batch()
    want, want_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    patch_causal_lm(model, "ce")
    got, got_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=0)
    assert_grads_close(got_grads, want_grads)
    if model_type in ("mixtral", "qwen3_moe"):
        assert got.aux_loss is not None and torch.equal(got.aux_loss, want.aux_loss)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_patched_dft_equals_trls_dft(model_type):
    model = tiny_lm(model_type)
    input_ids, labels = batch()
    model.zero_grad()
    trl_dft(model(input_ids=input_ids).logits, labels).backward()
    want_grads = grads(model)
    with torch.no_grad():
        want = trl_dft(model(input_ids=input_ids).logits, labels)
    patch_causal_lm(model, "dft")
    got, got_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    torch.testing.assert_close(got.loss, want, rtol=RTOL, atol=1e-7)
    assert_grads_close(got_grads, want_grads)


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches with num_items_in_batch (as the Trainer passes it) sum to the loss and
    the gradients of the whole batch, although they count different numbers of tokens."""
    model = tiny_lm("qwen3")
    patch_causal_lm(model, "dft", entropy_weight=0.1)
    input_ids, labels = batch(batch_size=4)
    labels[2, :7] = -100
    whole, whole_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    num_items = (labels[:, 1:] != -100).sum()
    model.zero_grad()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        loss = model(input_ids=input_ids[rows], labels=labels[rows], num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.loss, rtol=RTOL, atol=0)
    assert_grads_close(grads(model), whole_grads)


def test_shift_labels_and_logits_to_keep():
    model = tiny_lm("llama")
    input_ids, labels = batch()
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    patch = patch_causal_lm(model, "ce", logits="always")
    with torch.no_grad():
        out = model(input_ids=input_ids, shift_labels=shift, labels=labels)
        torch.testing.assert_close(out.loss, F.cross_entropy(logits.flatten(0, 1), shift.flatten()), rtol=RTOL, atol=0)
        torch.testing.assert_close(out.logits, logits)  # logits="always": the model's own, as well
        kept = model(input_ids=input_ids, labels=labels, logits_to_keep=4)
        want = F.cross_entropy(logits[:, -4:].flatten(0, 1), shift[:, -4:].flatten())
        torch.testing.assert_close(kept.loss, want, rtol=RTOL, atol=0)
        assert kept.logits.shape == (2, 4, VOCAB)
    assert patch.calls == 2


def test_eval_keeps_logits_and_no_labels_falls_back():
    model = tiny_lm("gemma2")
    input_ids, labels = batch()
    with torch.no_grad():
        reference = model(input_ids=input_ids, labels=labels)
    patch = patch_causal_lm(model, "ce", logits="eval")
    with torch.no_grad():
        assert model(input_ids=input_ids, labels=labels).logits is None  # training mode
        model.eval()
        out = model(input_ids=input_ids, labels=labels)
        plain = model(input_ids=input_ids)
        model.train()
        as_tuple = model(input_ids=input_ids, labels=labels, use_cache=True, return_dict=False)
    torch.testing.assert_close(out.logits, reference.logits)
    torch.testing.assert_close(out.loss, reference.loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(plain.logits, reference.logits)
    assert plain.loss is None and patch.calls == 3
    # the model's tuple is (loss, logits, cache): the logits' place is kept, None
    torch.testing.assert_close(as_tuple[0], reference.loss, rtol=RTOL, atol=0)
    assert as_tuple[1] is None and isinstance(as_tuple[2], transformers.Cache)
    model.eval()
    generated = model.generate(input_ids[:1, :3], max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, 5)


def test_aepg_follows_its_schedule_and_unpatch_restores():
    model = tiny_lm("llama")
    input_ids, labels = batch()
    schedule = ak.LinearAnneal(4)
    patch_causal_lm(model, "aepg", schedule=schedule)
    with torch.no_grad():
        logits = model.model(input_ids=input_ids).last_hidden_state @ model.lm_head.weight.t()
        target = F.pad(labels, (0, 1), value=-100)[:, 1:].flatten()
        for _ in range(2):
            want = ak.aepg_loss(logits.flatten(0, 1), target, schedule.alpha, backend="eager")
            torch.testing.assert_close(model(input_ids=input_ids, labels=labels).loss, want, rtol=RTOL, atol=0)
            schedule.step()
    unpatch_causal_lm(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head) and get_patch(model) is None
    assert model(input_ids=input_ids, labels=labels).logits.shape == (2, 9, VOCAB)


def test_a_deep_copy_is_patched_on_its_own():
    """copy.deepcopy of a patched model (a reference or EMA model) computes with its own weights."""
    import copy

    model = tiny_lm("llama")
    input_ids, labels = batch()
    patch = patch_causal_lm(model, "ce")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        want = F.cross_entropy(
            twin.lm_head(twin.model(input_ids=input_ids).last_hidden_state)[:, :-1].flatten(0, 1),
            labels[:, 1:].flatten(),
        )
        got = twin(input_ids=input_ids, labels=labels).loss
    assert get_patch(twin) is not patch and get_patch(twin).model is twin and patch.calls == 0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    unpatch_causal_lm(twin)
    assert get_patch(model) is patch


def test_peft_lora_on_the_base_model():
    """LoRA on the attention, the LM head frozen: patched through the PEFT wrapper, the loss and
    the adapters' gradients equal the unpatched PEFT model's."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_lm("llama"), config)
    input_ids, labels = batch()
    want, want_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert want_grads and all("lora" in name for name in want_grads)
    patch = patch_causal_lm(model, "ce")
    got, got_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert patch.calls == 1 and got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=0)
    assert_grads_close(got_grads, want_grads)


def test_loss_function_for_users_who_keep_logits():
    model = tiny_lm("llama")
    input_ids, labels = batch()
    ref_dft = ForCausalLMPolicyLoss("dft")
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        num_items = torch.tensor(11)
        got = ref_dft(logits, labels, VOCAB, num_items_in_batch=num_items)
        want = trl_dft(logits, labels) * (labels[:, 1:] != -100).sum() / num_items
        torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    model.loss_function = ForCausalLMPolicyLoss("ce")
    out = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()), rtol=RTOL, atol=0
    )


def test_token_stats_per_mode():
    """pop_stats: the means over the counted tokens only (an ignored row's entropy is not 0),
    train and eval apart, reset by each read."""
    model = tiny_lm("llama")
    input_ids, labels = batch()
    patch = patch_causal_lm(model, "ce", track_stats=True)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1]
        model(input_ids=input_ids, labels=labels)
    target = labels[:, 1:]
    counted = target != -100
    p = torch.softmax(logits, -1)
    entropy = -(p * p.log()).sum(-1)[counted].mean()
    p_y = p.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[counted].mean()
    accuracy = (logits.argmax(-1) == target)[counted].double().mean()
    stats = patch.pop_stats("train")
    assert stats.keys() == {"entropy", "mean_p_target", "mean_token_accuracy"}
    assert stats["entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    assert stats["mean_p_target"] == pytest.approx(p_y.item(), rel=1e-5)
    assert stats["mean_token_accuracy"] == pytest.approx(accuracy.item())
    assert patch.pop_stats("train") == {} and patch.pop_stats("eval") == {}


# --- refusals ------------------------------------------------------------------------------------


def test_refuses_unsupported_models():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="supports the \\*ForCausalLM models of"):
        patch_causal_lm(gpt2)
    with pytest.raises(TypeError, match="needs a transformers \\*ForCausalLM model"):
        patch_causal_lm(torch.nn.Linear(2, 2))
    olmo = transformers.Olmo2ForCausalLM(
        transformers.Olmo2Config(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    )
    with pytest.raises(ValueError, match="model_type 'olmo2'"):
        patch_causal_lm(olmo)


@pytest.mark.parametrize("where", ["target_modules", "modules_to_save"])
def test_refuses_a_peft_wrapped_lm_head(where):
    kwargs = (
        {"target_modules": ["q_proj", "lm_head"]}
        if where == "target_modules"
        else {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    )
    model = peft.get_peft_model(tiny_lm("llama"), peft.LoraConfig(r=2, **kwargs))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        patch_causal_lm(model)


def test_refuses_what_it_cannot_honour():
    model = tiny_lm("llama")
    model.loss_function = ForCausalLMPolicyLoss("ce")
    with pytest.raises(ValueError, match="has its own loss function"):
        patch_causal_lm(model)
    model = tiny_lm("llama")
    with pytest.raises(ValueError, match="loss must be one of"):
        patch_causal_lm(model, "nll")
    with pytest.raises(ValueError, match="needs exactly one of schedule"):
        patch_causal_lm(model, "aepg")
    with pytest.raises(TypeError, match="takes the options"):
        patch_causal_lm(model, "dft", reduction="sum")
    with pytest.raises(ValueError, match="loss='dft' sets loss_value='dft'"):
        patch_causal_lm(model, "dft", loss_value="policy")
    with pytest.raises(ValueError, match="label_smoothing"):  # the op's own message, at patch time
        patch_causal_lm(model, "ce", label_smoothing=2.0)
    with pytest.raises(ValueError, match="logits must be one of"):
        patch_causal_lm(model, "ce", logits="sometimes")
    assert get_patch(model) is None  # nothing half-patched
    patch_causal_lm(model, "ce")
    with pytest.raises(ValueError, match="patched already"):
        patch_causal_lm(model, "dft")
    input_ids, labels = batch()
    with pytest.raises(TypeError, match="fused_lm_head=True"):
        model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    with pytest.raises(ValueError, match="labels give targets of shape"):
        model(input_ids=input_ids, labels=labels[:, :5])


# --- the Trainer ---------------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seq_len=9):
        self.input_ids, self.labels = batch(batch_size=n, seq_len=seq_len)

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class _Reporter(transformers.TrainerCallback):
    """Stands for a reporting integration: records the logs it is given."""

    seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        type(self).seen.append(dict(logs))


def test_trainer_steps_the_schedule_per_optimizer_step(tmp_path):
    """A few Trainer steps with gradient accumulation: the loss falls, the schedule steps once per
    optimizer step (not per micro-batch), the logs carry alpha, entropy and token accuracy."""
    model = tiny_lm("llama")
    schedule = ak.LinearAnneal(100)
    patch = patch_causal_lm(model, "aepg", schedule=schedule)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-2,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[_Reporter])
    AlphaScheduleCallback(schedule, patch, task_steps=50).attach(trainer)
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    reported = [entry for entry in _Reporter.seen if "loss" in entry]
    assert reported and all({"alpha", "entropy", "mean_token_accuracy"} <= entry.keys() for entry in reported)
    assert schedule.step_count == 6
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["alpha"] for entry in logs] == pytest.approx([1 - 2 / 50, 1 - 4 / 50, 1 - 6 / 50])
    assert all({"entropy", "mean_token_accuracy", "mean_p_target"} <= entry.keys() for entry in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert patch.calls == 12


def test_callback_refuses_a_trainer_that_bypassed_the_patch():
    patch = patch_causal_lm(tiny_lm("llama"), "ce")
    callback = AlphaScheduleCallback(patch=patch)
    state = transformers.TrainerState()
    with pytest.raises(RuntimeError, match="without calling the patched forward"):
        callback.on_log(None, state, None, logs={})
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        callback.on_train_begin(
            transformers.TrainingArguments(output_dir="unused", label_smoothing_factor=0.1, report_to=[], use_cpu=True),
            state,
            None,
        )


def test_patched_step_peak_memory_is_far_below_the_models():
    """A realistic vocabulary (128256) on a tiny model, 1024 tokens: the model's own loss holds
    (N, V) fp32 logits, their log-softmax and their gradient (>= 1.5 GB); the patched step holds a
    64 MiB chunk and its gradient. Measured on the resident set (aepg-bench's sampler)."""
    from aepg_kernels.bench.llm import peak_extra_bytes

    model = tiny_lm(
        "llama",
        vocab_size=128256,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    input_ids = torch.randint(0, 128256, (4, 256))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    step()  # warm-up: the parameters' gradients exist in both measurements
    unpatched, _ = peak_extra_bytes(step, torch.device("cpu"))
    patch_causal_lm(model, "dft")
    step()
    patched, _ = peak_extra_bytes(step, torch.device("cpu"))
    logits_bytes = 4 * 256 * 128256 * 4
    assert unpatched > 2 * logits_bytes
    assert patched < 0.25 * unpatched, f"patched {patched / 2**20:.0f} MiB vs unpatched {unpatched / 2**20:.0f} MiB"

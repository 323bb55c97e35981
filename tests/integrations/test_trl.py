"""PolicySFTTrainer: TRL's SFTTrainer optimising the patched loss (tiny random Llama, CPU, offline)."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

import aepg_kernels as ak  # noqa: E402
from aepg_kernels.integrations.transformers import AlphaScheduleCallback, patch_causal_lm  # noqa: E402
from aepg_kernels.integrations.trl import PolicySFTTrainer  # noqa: E402
from tests.integrations.test_transformers import RTOL, assert_grads_close  # noqa: E402
from tests.integrations.tiny_lms import VOCAB, grads, tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
    )


@pytest.fixture(scope="module")
def dataset():
    """Pre-tokenized prompt-completion rows of uneven length, the prompt's labels -100."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(16):
        n = int(torch.randint(6, 14, (1,), generator=generator))
        ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist() + [2]
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return datasets.Dataset.from_list(rows)


def sft_config(tmp_path, **overrides):
    return trl.SFTConfig(
        **{
            **dict(
                output_dir=str(tmp_path),
                max_steps=2,
                per_device_train_batch_size=4,
                learning_rate=1e-2,
                use_cpu=True,
                bf16=False,
                save_strategy="no",
                report_to=[],
                logging_steps=1,
                shuffle_dataset=False,
                seed=0,
                disable_tqdm=True,
            ),
            **overrides,
        }
    )


def first_batch_grads(trainer, rows=4):
    """The gradients of the trainer's loss on its first batch, as its training step computes them."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    num_items = (batch["labels"][:, 1:] != -100).sum()
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), grads(trainer.model)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_policy_sft_trainer_optimises_the_patched_dft(tmp_path, tokenizer, dataset, lora):
    """Loss and gradients of PolicySFTTrainer with the patched DFT equal TRL's own loss_type="dft"
    on the same batch (with LoRA: the adapters' gradients, the LM head frozen)."""
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    model = tiny_lm("llama")
    reference = trl.SFTTrainer(
        model=copy.deepcopy(model),
        args=sft_config(tmp_path / "trl", loss_type="dft"),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),
    )
    ours = PolicySFTTrainer(
        model=model,
        args=sft_config(tmp_path / "ours"),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        policy="dft",
    )
    want, want_grads = first_batch_grads(reference)
    got, got_grads = first_batch_grads(ours)
    assert ours.patch.calls == 1
    if lora:
        assert want_grads and all("lora" in name for name in want_grads)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    assert_grads_close(got_grads, want_grads)


def test_policy_sft_trainer_trains_aepg_with_its_schedule(tmp_path, tokenizer, dataset):
    """A few steps with gradient accumulation: the loss falls, the schedule steps per optimizer
    step, and TRL's logs carry the kernel's entropy and token accuracy."""
    model = tiny_lm("llama")
    schedule = ak.CosineAnneal(6)
    patch = patch_causal_lm(model, "aepg", schedule=schedule, entropy_weight=0.05)
    trainer = PolicySFTTrainer(
        model=model,
        args=sft_config(tmp_path, max_steps=6, gradient_accumulation_steps=2, learning_rate=3e-2, logging_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[AlphaScheduleCallback(schedule)],
    )
    trainer.train()
    assert schedule.step_count == 6 and patch.calls == 12
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(
        {"entropy", "mean_token_accuracy", "mean_p_target", "num_tokens", "alpha"} <= entry.keys() for entry in logs
    )
    assert all(0 < entry["entropy"] <= torch.log(torch.tensor(float(VOCAB))).item() for entry in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.parametrize("processes", [1, 4])
def test_moe_aux_loss_scaled_as_trls(tmp_path, tokenizer, dataset, processes):
    """A MoE model with the router's auxiliary loss, two accumulation steps, tokens averaged across
    (faked) processes: PolicySFTTrainer's CE equals TRL's NLL (TRL scales the token loss by the
    processes, the auxiliary loss by the accumulation steps)."""

    def loss_of(trainer):
        accelerator = trainer.accelerator
        accelerator.__class__ = type("Faked", (type(accelerator),), {"num_processes": processes})
        trainer.current_gradient_accumulation_steps = 2  # as the training loop sets it
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())

    model = tiny_lm("mixtral")
    reference = trl.SFTTrainer(
        model=copy.deepcopy(model), args=sft_config(tmp_path / "trl"), train_dataset=dataset, processing_class=tokenizer
    )
    ours = PolicySFTTrainer(
        model=model, args=sft_config(tmp_path / "ours"), train_dataset=dataset, processing_class=tokenizer, policy="ce"
    )
    torch.testing.assert_close(loss_of(ours), loss_of(reference), rtol=RTOL, atol=0)


def test_stock_sft_trainer_is_caught(tmp_path, tokenizer, dataset):
    """The stock SFTTrainer computes its own loss with the patched model: the callback stops it
    at the first log instead of letting it train silently."""
    patch = patch_causal_lm(tiny_lm("llama"), "dft")
    trainer = trl.SFTTrainer(
        model=patch.model,
        args=sft_config(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[AlphaScheduleCallback(patch=patch)],
    )
    with pytest.raises(RuntimeError, match="use PolicySFTTrainer"):
        trainer.train()


def test_policy_sft_trainer_refusals(tmp_path, tokenizer, dataset):
    with pytest.raises(ValueError, match="loss_type='dft' selects TRL's own loss"):
        PolicySFTTrainer(
            model=tiny_lm("llama"),
            args=sft_config(tmp_path, loss_type="dft"),
            train_dataset=dataset,
            processing_class=tokenizer,
            policy="dft",
        )
    with pytest.raises(ValueError, match="needs a model patched by patch_causal_lm"):
        PolicySFTTrainer(
            model=tiny_lm("llama"), args=sft_config(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )

"""data.label_noise: symmetric noise on the train split only, seeded from run.seed, recorded."""

import collections
import json

import pytest
import torch

from aepg_kernels.train import ConfigError, DataConfig, load_config
from aepg_kernels.train.data import add_label_noise, build_data, symmetric_label_noise
from aepg_kernels.train.report import write_run_outputs
from tests.train.test_train_compare import two_task_summary

DIGITS_CFG = DataConfig(name="digits", img_size=8, rrc_scale=(0.6, 1.0), hflip=False)
MEAN, STD = (0.2,), (0.25,)


@pytest.fixture(scope="module")
def digits():
    return build_data(DIGITS_CFG, MEAN, STD)


def test_the_fraction_is_flipped_each_to_another_class():
    targets = torch.arange(10).repeat(100)  # 1000 samples, 10 classes
    noisy, record = symmetric_label_noise(targets, 0.2, seed=3)
    changed = torch.nonzero(noisy != targets).flatten()
    assert len(changed) == record["num_flipped"] == 200 and changed.tolist() == record["indices"]
    assert record["original_labels"] == targets[changed].tolist()
    assert record["noisy_labels"] == noisy[changed].tolist()
    # Uniform over the 9 other classes: every (class -> other class) pair is reachable, none dominates.
    counts = torch.bincount(noisy[changed] - targets[changed] + 10, minlength=20)
    assert counts[10] == 0 and (counts[1:10] > 0).all() and (counts[11:20] > 0).all()
    assert torch.bincount(noisy[changed], minlength=10).max() < 45  # 20 expected per class


def test_the_same_seed_flips_the_same_samples_another_seed_others():
    targets = torch.arange(5).repeat(40)
    a, record_a = symmetric_label_noise(targets, 0.3, seed=7)
    b, record_b = symmetric_label_noise(targets, 0.3, seed=7)
    c, record_c = symmetric_label_noise(targets, 0.3, seed=8)
    assert torch.equal(a, b) and record_a == record_b
    assert record_a["indices"] != record_c["indices"] and not torch.equal(a, c)
    _, smaller = symmetric_label_noise(targets, 0.1, seed=7)
    assert set(smaller["indices"]) < set(record_a["indices"])  # nested in the fraction


def test_noise_applies_to_the_train_split_only_and_zero_is_a_no_op(digits):
    clean, record = add_label_noise(digits, 0.0, run_seed=0)
    assert clean is digits and record is None
    noisy, record = add_label_noise(digits, 0.2, run_seed=0)
    assert noisy.test is digits.test and noisy.num_classes == digits.num_classes
    flipped = torch.nonzero(noisy.train.targets != digits.train.targets).flatten()
    assert len(flipped) == record["num_flipped"] == round(0.2 * len(digits.train.targets))
    i = flipped[0].item()
    assert noisy.train.dataset[i][1] == noisy.train.targets[i] != digits.train.dataset[i][1]
    torch.manual_seed(0)  # the train transform draws a random crop
    image = noisy.train.dataset[i][0]
    torch.manual_seed(0)
    assert torch.equal(image, digits.train.dataset[i][0])  # the same image
    assert noisy.info["label_noise"]["num_flipped"] == record["num_flipped"] and "label_noise" not in digits.info
    assert record["run_seed"] == 0 and "train split" in record["indices_are"]
    again, _ = add_label_noise(digits, 0.2, run_seed=0)
    other, _ = add_label_noise(digits, 0.2, run_seed=1)
    assert torch.equal(again.train.targets, noisy.train.targets)
    assert not torch.equal(other.train.targets, noisy.train.targets)


def test_noise_record_is_written_with_the_outputs(tmp_path):
    cfg = load_config(None, ["data.label_noise=0.2"])
    _, record = symmetric_label_noise(torch.arange(4).repeat(5), 0.2, seed=0)
    paths = write_run_outputs(tmp_path, cfg, two_task_summary(0.9, 0.6, 0.8), {}, record)
    assert json.loads(paths["label_noise"].read_text()) == record
    assert "label_noise" not in write_run_outputs(tmp_path / "clean", cfg, two_task_summary(0.9, 0.6, 0.8))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_label_noise_must_be_a_fraction_below_one(value):
    with pytest.raises(ConfigError, match=r"data.label_noise: must be in \[0, 1\)"):
        load_config(None, [f"data.label_noise={value}"])


def test_one_group_is_the_plain_draw_and_task_groups_keep_each_flip_in_its_task():
    targets = torch.arange(10).repeat(300)
    plain, record = symmetric_label_noise(targets, 0.2, seed=5)
    grouped, same = symmetric_label_noise(targets, 0.2, seed=5, groups=[list(range(10))])
    assert torch.equal(plain, grouped) and same == record  # committed all-class results stay reproducible
    tasks = [(3, 7, 1), (0, 9), (2, 4, 5, 6, 8)]  # unequal sizes: one draw reduced per group
    noisy, record = symmetric_label_noise(targets, 0.2, seed=5, groups=tasks)
    task_of = {c: t for t, classes in enumerate(tasks) for c in classes}
    pairs = list(zip(record["original_labels"], record["noisy_labels"]))
    assert len(pairs) == 600 and all(new != old and task_of[new] == task_of[old] for old, new in pairs)
    for classes in tasks:  # uniform over the other classes of the task: ~60 flips of a class spread evenly
        for old in classes:
            reached = collections.Counter(new for o, new in pairs if o == old)
            assert set(reached) == set(classes) - {old}, (old, reached)
            assert max(reached.values()) < 2.5 * min(reached.values()), (old, reached)


@pytest.mark.parametrize(
    "groups, match",
    [
        ([(0, 1), (2,)], "at least 2 classes in every group"),
        ([(0, 1)], "must partition the classes"),
        ([(0, 1, 2), (2, 3)], "must partition the classes"),
    ],
)
def test_groups_must_partition_the_classes_into_flippable_sets(groups, match):
    targets = torch.arange(3 if match.startswith("at least") else 4).repeat(10)
    with pytest.raises(ValueError, match=match):
        symmetric_label_noise(targets, 0.2, seed=0, groups=groups)


def test_task_scope_is_recorded_and_rejects_unknown_scopes(digits):
    tasks = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    noisy, record = add_label_noise(digits, 0.2, run_seed=0, groups=tasks)
    assert record["groups"] == noisy.info["label_noise"]["groups"] == [list(t) for t in tasks]
    flipped = torch.nonzero(noisy.train.targets != digits.train.targets).flatten()
    assert ((noisy.train.targets[flipped] // 2) == (digits.train.targets[flipped] // 2)).all()
    _, plain = add_label_noise(digits, 0.2, run_seed=0)
    assert plain["groups"] == "all" and plain["indices"] == record["indices"]  # the same samples flip
    with pytest.raises(ConfigError, match="data.label_noise_scope"):
        load_config(None, ["data.label_noise_scope=class"])

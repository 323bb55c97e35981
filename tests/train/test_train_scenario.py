import pytest
import torch

from aepg_kernels.train import ClassIncrementalScenario

TARGETS = torch.arange(100).repeat(3)  # 100 classes, 3 samples each


@pytest.mark.parametrize("order", ["natural", "permuted"])
def test_tasks_partition_the_classes(order):
    s = ClassIncrementalScenario.from_targets(TARGETS, num_tasks=10, order=order, seed=0)
    classes = [c for t in range(10) for c in s.task_classes(t)]
    assert sorted(classes) == list(range(100)) and s.task_sizes == (10,) * 10
    assert [s.class_range(t) for t in range(3)] == [(0, 10), (10, 20), (20, 30)]
    indices = torch.cat([s.task_indices(TARGETS, t) for t in range(10)])
    assert sorted(indices.tolist()) == list(range(300))
    for t in range(10):
        idx = s.task_indices(TARGETS, t)
        assert set(TARGETS[idx].tolist()) == set(s.task_classes(t))
        lo, hi = s.class_range(t)
        remapped = s.remap(TARGETS[idx])
        assert remapped.min() >= lo and remapped.max() < hi


def test_natural_order_is_sorted_and_remap_is_the_identity():
    s = ClassIncrementalScenario.from_targets(TARGETS, classes_per_task=20)
    assert s.class_order == tuple(range(100)) and s.num_tasks == 5
    assert torch.equal(s.remap(TARGETS), TARGETS)


def test_seeded_order_reproduces_and_seeds_differ():
    a = ClassIncrementalScenario.from_targets(TARGETS, num_tasks=10, order="permuted", seed=1993)
    assert a == ClassIncrementalScenario.from_targets(TARGETS, num_tasks=10, order="permuted", seed=1993)
    assert (
        a.class_order
        != ClassIncrementalScenario.from_targets(TARGETS, num_tasks=10, order="permuted", seed=1994).class_order
    )
    assert a.class_order != tuple(range(100))
    restored = ClassIncrementalScenario.from_state_dict(a.state_dict())
    assert restored == a
    assert torch.equal(restored.remap(TARGETS), a.remap(TARGETS))
    # The remap sends each class to its position in the stored order.
    assert a.remap(torch.tensor(a.class_order)).tolist() == list(range(100))


def test_sparse_labels_and_uneven_splits():
    s = ClassIncrementalScenario.from_targets([7, 3, 3, 11, 20, 7], num_tasks=3)
    assert s.class_order == (3, 7, 11, 20) and s.task_sizes == (2, 1, 1)
    assert s.remap([20, 3]).tolist() == [3, 0]
    assert ClassIncrementalScenario.create(range(10), classes_per_task=4).task_sizes == (4, 4, 2)
    assert ClassIncrementalScenario.create(range(101), num_tasks=10).task_sizes == (11,) + (10,) * 9


def test_train_and_test_splits():
    test_targets = torch.arange(100)
    s = ClassIncrementalScenario.from_targets(TARGETS, num_tasks=4, order="permuted", seed=0)
    for t in range(s.num_tasks):
        train, test = s.task_indices(TARGETS, t), s.task_indices(test_targets, t)
        assert len(train) == 75 and len(test) == 25
        assert set(test_targets[test].tolist()) == set(s.task_classes(t))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(num_tasks=2, classes_per_task=5), "exactly one"),
        (dict(num_tasks=11), "num_tasks must be in"),
        (dict(num_tasks=2, order="permuted"), "needs a seed"),
        (dict(num_tasks=2, order="random"), "order must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassIncrementalScenario.create(range(10), **kwargs)


def test_unknown_label():
    with pytest.raises(ValueError, match=r"labels \[42\]"):
        ClassIncrementalScenario.create(range(10), num_tasks=2).remap([1, 42])


def test_from_config_seeds_the_order_with_the_run_seed_unless_given():
    from aepg_kernels.train import ScenarioConfig

    cfg = ScenarioConfig(num_tasks=None, classes_per_task=25, class_order="permuted")
    s = ClassIncrementalScenario.from_config(cfg, TARGETS, seed=3)
    assert s == ClassIncrementalScenario.from_targets(TARGETS, classes_per_task=25, order="permuted", seed=3)
    pinned = ScenarioConfig(num_tasks=4, class_order="permuted", order_seed=1993)
    assert ClassIncrementalScenario.from_config(pinned, TARGETS, seed=3) == ClassIncrementalScenario.from_config(
        pinned, TARGETS, seed=4
    )

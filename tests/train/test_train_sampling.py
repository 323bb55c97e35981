"""The seeded sampling of a run: each rank's share of an epoch's order, and samples whose random
augmentation depends on their position only."""

import pytest
import torch

from aepg_kernels.train.sampling import EpochBatches, SeededSamples
from tests.train.tiny_vit import class_images


def test_epoch_batches_split_each_global_batch_across_ranks():
    one = EpochBatches(13, 4, seed=0, task=1, epoch=2)
    ranks = [list(EpochBatches(13, 4, seed=0, task=1, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert sorted(one.permutation) == list(range(13)) and len(one) == 4
    for batch, keys in enumerate(one):
        assert ranks[0][batch] + ranks[1][batch] == keys  # rank 0 first half, rank 1 second half
    assert [len(b) for b in ranks[0]] == [2, 2, 2, 0] and [len(b) for b in ranks[1]] == [2, 2, 2, 1]
    assert list(EpochBatches(13, 4, seed=0, task=1, epoch=2, start=2)) == list(one)[2:]
    assert EpochBatches(13, 4, seed=0, task=1, epoch=3).permutation != one.permutation
    with pytest.raises(ValueError, match=r"data.batch_size=5 must be a multiple of the number of processes"):
        EpochBatches(13, 5, seed=0, task=0, epoch=0, world_size=2)


def test_seeded_samples_depend_on_the_position_only():
    data, _ = class_images([4], 0)
    samples = SeededSamples(data, 0, "sample", 0, 0)
    torch.manual_seed(123)
    a = samples[(2, 1)][0]
    state = torch.get_rng_state()
    torch.manual_seed(456)
    samples[(0, 0)]
    assert torch.equal(samples[(2, 1)][0], a) and not torch.equal(samples[(3, 1)][0], a)
    assert not torch.equal(SeededSamples(data, 0, "sample", 0, 1)[(2, 1)][0], a)
    assert torch.equal(SeededSamples(data, 0, "sample", 0, 0)[2][0], SeededSamples(data, 0, "sample", 0, 0)[(2, 2)][0])
    torch.manual_seed(123)
    samples[(2, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was

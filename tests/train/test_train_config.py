import pytest

from aepg_kernels.train import ConfigError, config_from_dict, config_to_yaml, list_presets, load_config

PRESETS = [
    "cifar100_10task_lora",
    "demo_digits",
    "demo_mnist5k",
    "imagenet_r_10task_adapter",
    "imagenet_r_10task_lora",
    "imagenet_r_10task_prefix",
]


def test_presets_ship_and_load():
    assert list_presets() == PRESETS
    for name in PRESETS:
        assert load_config(name).loss.name == "aepg"


def test_paper_settings():
    cfg = load_config("imagenet_r_10task_prefix")
    assert (cfg.peft.kind, cfg.peft.prefix_length, cfg.peft.blocks) == ("prefix", 10, [0, 1, 2, 3, 4])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (5e-4, (0.9, 0.999), 0.0)
    assert (cfg.optim.epochs, cfg.optim.peft_frozen_epochs, cfg.data.batch_size) == (50, 30, 256)
    assert (cfg.loss.schedule, cfg.loss.tau, cfg.model.head_init_std) == ("sigmoid", 6.0, 0.001)
    assert cfg.data.rrc_scale == (0.05, 1.0) and cfg.scenario.num_tasks == 10
    lora = load_config("imagenet_r_10task_lora").peft
    assert (lora.kind, lora.lora_rank, lora.lora_targets) == ("lora", 4, "kv")
    assert load_config("imagenet_r_10task_adapter").peft.adapter_bottleneck == 5
    assert load_config("cifar100_10task_lora").data.name == "cifar100"


def test_overrides():
    cfg = load_config(
        "demo_digits",
        [
            "optim.lr=1e-3",
            "peft.blocks=[0, 2]",
            "loss.name=ce",
            "scenario.num_tasks=null",
            "scenario.classes_per_task=5",
            "model.kwargs.depth=6",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.peft.blocks == [0, 2] and cfg.loss.name == "ce" and cfg.scenario.classes_per_task == 5
    assert cfg.model.kwargs["depth"] == 6 and cfg.model.kwargs["embed_dim"] == 64  # merged, not replaced


def test_extends_a_file(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: imagenet_r_10task_lora\noptim: {epochs: 3, peft_frozen_epochs: 2}\n")
    (tmp_path / "child.yaml").write_text("extends: mine.yaml\nloss: {name: ep}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.optim.epochs, cfg.loss.name, cfg.peft.kind) == (3, "ep", "lora")


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr; valid keys of optim: name, lr, betas"):
        load_config("demo_digits", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key optimizer; valid keys: model, peft, data, scenario"):
        config_from_dict({"optimizer": {}})


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=fast", r"optim\.lr: must be a float"),
        ("optim.epochs=2.5", r"optim\.epochs: must be int, got float"),
        ("peft.freeze_backbone=1", r"peft\.freeze_backbone: must be bool"),
        ("peft.kind=vpt", r"peft\.kind: must be one of \['lora', 'adapter', 'prefix', 'prompt', 'none'\]"),
        ("peft.blocks=3", r"peft\.blocks: must be a list"),
        ("peft.blocks=[0, a]", r"peft\.blocks\[1\]: must be int"),
        ("optim.betas=[0.9]", r"optim\.betas: must have 2 items"),
        ("optim.peft_frozen_epochs=60", r"peft_frozen_epochs <= epochs"),
        ("scenario.classes_per_task=5", r"exactly one of num_tasks / classes_per_task"),
        ("loss.schedule=constant", r"loss\.alpha: the constant schedule needs"),
        ("run=3", r"run: must be a mapping"),
        ("optim.lr", r"not of the form section\.key=value"),
    ],
)
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo_digits", [override])


def test_unknown_preset_or_file(tmp_path):
    with pytest.raises(ConfigError, match="presets: cifar100_10task_lora, demo_digits"):
        load_config("imagenet_r_5task")
    with pytest.raises(ConfigError, match="config file 'demo_digits.yaml' not found"):
        load_config("demo_digits.yaml")  # a path never falls back to the preset of the same name
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular extends"):
        load_config(str(tmp_path / "loop.yaml"))


def test_resolved_config_round_trips():
    import yaml

    cfg = load_config("imagenet_r_10task_adapter", ["run.seed=3"])
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_the_names_of_data_sets_and_pretraining_sets_agree():
    """The config's Literals, the data sources, the pretraining recipes and the overlap rule name
    the same sets: one added in one place and not the others fails here."""
    import typing

    from aepg_kernels.train import config, data, pretrain

    hints = typing.get_type_hints(config.DataConfig)
    assert set(typing.get_args(hints["name"])) == set(data._SOURCES)
    (pretrain_sets,) = [
        typing.get_args(a)
        for a in typing.get_args(typing.get_type_hints(config.ModelConfig)["pretrain_on"])
        if typing.get_args(a)
    ]
    assert set(pretrain_sets) == set(pretrain.RECIPES) == set(config.PRETRAIN_OVERLAP)
    assert set(config.PRETRAIN_OVERLAP.values()) <= set(data._SOURCES)

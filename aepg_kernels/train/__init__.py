"""Reference ViT-PEFT class-incremental trainer on the fused policy-gradient loss (docs/trainer.md).

Built on the public `aepg_kernels` API only. Needs the `train` extra (timm, pyyaml, scikit-learn,
mlxtend, matplotlib, tqdm): `pip install 'aepg-kernels[train]'`. timm, matplotlib and the datasets
are imported only when used.

    from aepg_kernels.train import load_config, run
    summary = run(load_config("demo_digits", ["loss.name=ce"]))
"""

from .checkpoint import ResumeError
from .compare import aggregate, format_compare_table, plot_compare, run_compare, write_compare_outputs
from .config import (
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    RunConfig,
    ScenarioConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    list_presets,
    load_config,
    parse_overrides,
)
from .data import ContinualData, LabelledSplit, backbone_normalization, build_data, load_mnist5k
from .evaluation import accuracy, predict_loader
from .heads import TaskHeads, local_loss, predict
from .losses import build_criterion, build_schedule
from .metrics import (
    AccuracyMatrix,
    accuracy_after_each_task,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    summarize,
)
from .model import ContinualViT, create_backbone
from .optim import build_optimizer
from .peft import (
    LoRAQKV,
    ParallelAdapter,
    PeftModule,
    PrefixAttention,
    PromptTokens,
    apply_peft,
    count_parameters,
    peft_parameters,
)
from .pretrain import ensure_pretrained_backbone
from .report import format_run_summary, write_run_outputs
from .runner import run
from .sampling import RemappedSubset, task_subsets
from .scenario import ClassIncrementalScenario
from .trainer import ContinualTrainer, TrainingInterrupted

__all__ = [
    "AccuracyMatrix",
    "ClassIncrementalScenario",
    "ConfigError",
    "ContinualData",
    "ContinualTrainer",
    "ContinualViT",
    "DataConfig",
    "LabelledSplit",
    "LoRAQKV",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelAdapter",
    "PeftConfig",
    "PeftModule",
    "PrefixAttention",
    "PromptTokens",
    "RemappedSubset",
    "ResumeError",
    "RunConfig",
    "ScenarioConfig",
    "TaskHeads",
    "TrainConfig",
    "TrainingInterrupted",
    "accuracy",
    "accuracy_after_each_task",
    "aggregate",
    "apply_peft",
    "average_incremental_accuracy",
    "backbone_normalization",
    "backward_transfer",
    "build_criterion",
    "build_data",
    "build_optimizer",
    "build_schedule",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "count_parameters",
    "create_backbone",
    "ensure_pretrained_backbone",
    "final_accuracy",
    "forgetting",
    "format_compare_table",
    "format_run_summary",
    "list_presets",
    "load_config",
    "load_mnist5k",
    "local_loss",
    "parse_overrides",
    "peft_parameters",
    "plot_compare",
    "predict",
    "predict_loader",
    "run",
    "run_compare",
    "summarize",
    "task_subsets",
    "write_compare_outputs",
    "write_run_outputs",
]

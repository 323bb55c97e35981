"""Reference ViT-PEFT class-incremental trainer on the fused policy-gradient loss (issue 4).

Built on the public `aepg_kernels` API only. Needs the `train` extra (timm, pyyaml):
`pip install 'aepg-kernels[train]'`. timm is imported only when a backbone is created.
"""
from .config import (ConfigError, DataConfig, LossConfig, ModelConfig, OptimConfig, PeftConfig, RunConfig,
                     ScenarioConfig, TrainConfig, config_from_dict, config_to_dict, config_to_yaml, list_presets,
                     load_config, parse_overrides)
from .evaluation import accuracy, predict_loader
from .heads import TaskHeads, local_loss, predict
from .losses import build_criterion, build_schedule
from .metrics import (AccuracyMatrix, accuracy_after_each_task, average_incremental_accuracy, backward_transfer,
                      final_accuracy, forgetting, summarize)
from .model import ContinualViT, create_backbone
from .peft import (LoRAQKV, ParallelAdapter, PeftModule, PrefixAttention, PromptTokens, apply_peft,
                   count_parameters, peft_parameters)
from .scenario import ClassIncrementalScenario
from .trainer import ContinualTrainer, RemappedSubset, task_subsets

__all__ = [
    "AccuracyMatrix", "ClassIncrementalScenario", "ConfigError", "ContinualTrainer", "ContinualViT", "DataConfig",
    "LoRAQKV", "LossConfig", "ModelConfig", "OptimConfig", "ParallelAdapter", "PeftConfig", "PeftModule",
    "PrefixAttention", "PromptTokens", "RemappedSubset", "RunConfig", "ScenarioConfig", "TaskHeads", "TrainConfig",
    "accuracy", "accuracy_after_each_task", "apply_peft", "average_incremental_accuracy", "backward_transfer",
    "build_criterion", "build_schedule", "config_from_dict", "config_to_dict", "config_to_yaml", "count_parameters",
    "create_backbone", "final_accuracy", "forgetting", "list_presets", "load_config", "local_loss",
    "parse_overrides", "peft_parameters", "predict", "predict_loader", "summarize", "task_subsets",
]

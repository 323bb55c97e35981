"""The class-incremental training loop of the paper (method.md section 5), minimal: tasks in the
scenario's order; per task a new head, a fresh Adam over the PEFT modules and the new head, the
loss on the current task's classes only, the alpha schedule reset; PEFT frozen for the first
`optim.peft_frozen_epochs` epochs of every task after the first; after each task, accuracy on
every task seen so far (argmax over all seen classes) into the accuracy matrix.

Not yet here (issue 4): data sets and transforms, checkpoint/resume, DDP, outputs and plots.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig
from .evaluation import accuracy
from .heads import local_loss
from .losses import build_criterion
from .metrics import AccuracyMatrix
from .model import ContinualViT
from .scenario import ClassIncrementalScenario


class RemappedSubset(Dataset):
    """`dataset[indices]` with each label replaced by its position in the scenario's class order."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, labels: torch.Tensor):
        self.dataset, self.indices, self.labels = dataset, indices.tolist(), labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x = self.dataset[self.indices[i]][0]
        return x, self.labels[i]


def task_subsets(scenario: ClassIncrementalScenario, dataset: Dataset, targets) -> List[RemappedSubset]:
    """One remapped subset per task of `dataset`, whose labels are `targets`."""
    remapped = scenario.remap(targets)
    subsets = []
    for task in range(scenario.num_tasks):
        indices = scenario.task_indices(targets, task)
        subsets.append(RemappedSubset(dataset, indices, remapped[indices]))
    return subsets


class ContinualTrainer:
    def __init__(self, model: ContinualViT, scenario: ClassIncrementalScenario, cfg: TrainConfig,
                 device: Optional[torch.device] = None, log: Callable[[str], None] = print):
        self.model, self.scenario, self.cfg, self.log = model, scenario, cfg, log
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.criterion = build_criterion(cfg.loss)
        self.schedule = getattr(self.criterion, "schedule", None)  # aepg only
        self.accuracy_matrix = AccuracyMatrix(scenario.num_tasks)
        self.history: List[Dict[str, float]] = []  # one entry per epoch
        self.trainable_per_task: List[int] = []
        self.generator = torch.Generator().manual_seed(cfg.run.seed)  # shuffling order

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.run.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_task(self, task: int, train_set: Dataset) -> None:
        cfg = self.cfg
        class_range = self.model.add_task(self.scenario.task_sizes[task])
        assert class_range == self.scenario.class_range(task), "heads and scenario disagree on the class layout"
        loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, generator=self.generator,
                            num_workers=cfg.data.num_workers)
        # The optimizer holds every parameter the task may train (add_task froze the older heads);
        # while the PEFT modules are frozen they have no gradient and Adam skips them.
        self.model.set_peft_trainable(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                     weight_decay=cfg.optim.weight_decay)
        if self.schedule is not None:
            # Assumption (the paper does not say): alpha spans all epochs of the task, head-only ones included.
            self.schedule.reset(cfg.optim.epochs * len(loader))
        frozen_epochs = cfg.optim.peft_frozen_epochs if task > 0 else 0
        for epoch in range(cfg.optim.epochs):
            peft_trainable = epoch >= frozen_epochs
            self.model.set_peft_trainable(peft_trainable)
            if epoch in (0, frozen_epochs):
                self.log(f"task {task} epoch {epoch}: {self.model.num_trainable_parameters()} trainable parameters"
                         f"{'' if peft_trainable else ' (PEFT frozen)'}")
            stats = self._train_epoch(loader, optimizer, class_range)
            self.history.append({"task": task, "epoch": epoch, "peft_trainable": peft_trainable, **stats})
        self.model.set_peft_trainable(True)
        self.trainable_per_task.append(self.model.num_trainable_parameters())  # PEFT + this task's head

    def _train_epoch(self, loader: DataLoader, optimizer: torch.optim.Optimizer, class_range) -> Dict[str, float]:
        self.model.train()
        # Sums stay on the device: no host synchronisation per step.
        totals = torch.zeros(4, device=self.device)  # loss, entropy, sample weight, alpha; summed over rows
        rows = 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            alpha = self.schedule.alpha if self.schedule is not None else float("nan")
            with self._autocast():
                logits = self.model(x)
            # bf16 logits go to the fused op as they are: it computes in fp32 internally.
            loss, stats = local_loss(self.criterion, logits, y, class_range, return_stats=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if self.schedule is not None:
                self.schedule.step()
            n = len(y)
            rows += n
            totals += torch.stack([loss.detach().float() * n, stats.entropy.sum(), stats.sample_weight.sum(),
                                   torch.as_tensor(alpha, dtype=torch.float32, device=self.device) * n])
        means = (totals / max(rows, 1)).tolist()
        return dict(zip(("loss", "entropy", "sample_weight", "alpha"), means, strict=True))

    def evaluate(self, task: int, test_sets: List[Dataset]) -> List[float]:
        """Accuracy on each task seen so far, recorded in row `task` of the accuracy matrix."""
        accs = []
        for i in range(task + 1):
            loader = DataLoader(test_sets[i], batch_size=self.cfg.data.eval_batch_size,
                                num_workers=self.cfg.data.num_workers)
            accs.append(accuracy(self.model, loader, self.device))
            self.accuracy_matrix.record(task, i, accs[-1])
        return accs

    def fit(self, train_set: Dataset, train_targets, test_set: Dataset, test_targets) -> Dict[str, object]:
        """Runs every task; returns the metric summary with the class order and per-epoch history."""
        train_sets = task_subsets(self.scenario, train_set, train_targets)
        test_sets = task_subsets(self.scenario, test_set, test_targets)
        for task in range(self.scenario.num_tasks):
            self.train_task(task, train_sets[task])
            accs = self.evaluate(task, test_sets)
            self.log(f"task {task}: accuracy per task {[round(a, 4) for a in accs]}")
        return {**self.accuracy_matrix.summary(), "scenario": self.scenario.state_dict(),
                "trainable_parameters_per_task": self.trainable_per_task, "history": self.history}

"""The class-incremental training loop of the paper (docs/trainer.md): tasks in the scenario's
order; per task a new head, a fresh Adam over the PEFT modules and the new head, the loss on the
current task's classes only, the alpha schedule reset; PEFT frozen for the first
`optim.peft_frozen_epochs` epochs of every task after the first; after each task, accuracy on
every task seen so far (argmax over all seen classes) into the accuracy matrix.

Reproducible and resumable: every random draw comes from a seed derived from (run.seed, task,
epoch, position), never from a stream carried along, so a run resumed from a checkpoint (written
at every task boundary and every `run.checkpoint_every` steps) replays exactly what an
uninterrupted run does, whatever data.num_workers:
- the epoch's sample order: a permutation seeded by (seed, task, epoch) (`sampling.EpochBatches`);
- each sample's augmentation: the CPU RNG seeded by (seed, task, epoch, position)
  (`sampling.SeededSamples`; test samples by (seed, test task, index));
- each step's model randomness (dropout, drop path): the global RNG seeded by (seed, task, epoch,
  batch, rank); each head's initialisation: seeded by (seed, task).
A feedback alpha schedule (loss.schedule=feedback) observes each step's batch statistics after the
optimizer step; its state (alpha itself) is checkpointed with the schedule's. The checkpoint's
content is `checkpoint.TrainerState`.

Data parallel (torchrun, see distributed.py): every rank takes an equal share of each global batch
of data.batch_size rows, gradients are averaged with one all_reduce per step, the epoch statistics
and the evaluation counts are summed over ranks, so every rank holds the same parameters and results.
"""

from __future__ import annotations

import math
import time
import types
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

import aepg_kernels as ak

from . import distributed
from .checkpoint import (
    Position,
    ResumeError,
    TrainerState,
    backbone_fingerprint,
    checkpoint_path,
    load_checkpoint,
    load_trained_state,
    save_checkpoint,
    trained_state,
)
from .config import TrainConfig, config_to_dict
from .evaluation import predict_loader
from .heads import local_loss
from .losses import build_criterion
from .metrics import AccuracyMatrix
from .model import ContinualViT
from .optim import build_optimizer
from .sampling import EpochBatches, SeededSamples, collate_or_none, derive_seed, task_subsets
from .scenario import ClassIncrementalScenario

EPOCH_MEANS = ("loss", "entropy", "sample_weight", "alpha")  # history: per-epoch means over the task's samples


class TrainingInterrupted(RuntimeError):
    """Raised by `fit(stop_after_steps=K)` after K optimizer steps: the output folder is left as a
    kill at that moment would leave it (the last checkpoint written before)."""


class ContinualTrainer:
    """`fit` runs every task, resuming by itself from `run.output_dir`'s checkpoint when
    `run.resume` is set. With torch.distributed initialised (distributed.init_from_env), every rank
    runs the same calls on its share of the data."""

    def __init__(
        self,
        model: ContinualViT,
        scenario: ClassIncrementalScenario,
        cfg: TrainConfig,
        device: Optional[torch.device] = None,
        log: Callable[[str], None] = print,
    ):
        self.model, self.scenario, self.cfg, self.log = model, scenario, cfg, log
        self.device = torch.device(device) if device is not None else distributed.resolve_device(cfg.run.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.model.to(self.device)
        distributed.broadcast_module(self.model)  # identical replicas whatever each rank's init drew
        self.criterion = build_criterion(cfg.loss, device=self.device)
        self.schedule = getattr(self.criterion, "schedule", None)  # aepg only
        self._feedback = hasattr(self.schedule, "observe")  # a schedule driven by the batch's stats
        self.accuracy_matrix = AccuracyMatrix(scenario.num_tasks)
        self.history: List[Dict[str, float]] = []  # one entry per epoch
        self.trainable_per_task: List[int] = []
        self.timing: List[float] = []  # seconds per task (training and evaluation)
        self.position = Position()
        self.global_step = 0  # optimizer steps so far, all tasks
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._resumed_totals: Optional[torch.Tensor] = None  # partial sums of a resumed epoch
        self._task_clock = time.perf_counter()  # perf_counter() at the start of the task, less resumed time
        self._stop_at: Optional[int] = None
        self._backbone_fingerprint: Optional[str] = None

    # -- setup ---------------------------------------------------------------------------------

    def _seed(self, *parts) -> None:
        torch.manual_seed(derive_seed(self.cfg.run.seed, *parts))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # Every parameter the task may train (add_task froze the older heads); while the PEFT modules
        # are frozen they have no gradient and Adam skips them.
        self.model.set_peft_trainable(True)
        return build_optimizer(self.model.trainable_parameters(), self.cfg.optim)

    def _batches(self, train_set: Dataset, task: int, epoch: int, start: int = 0) -> EpochBatches:
        return EpochBatches(
            len(train_set), self.cfg.data.batch_size, self.cfg.run.seed, task, epoch, self.rank, self.world_size, start
        )

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        # An own generator: the loader's worker base seed must not draw from the global RNG.
        generator = torch.Generator().manual_seed(self.cfg.run.seed)
        return DataLoader(
            dataset,
            num_workers=self.cfg.data.num_workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
            **kwargs,
        )

    # -- training ------------------------------------------------------------------------------

    def train_task(self, task: int, train_set: Dataset) -> None:
        """Trains task `task`, from the resumed position when it lies inside this task."""
        cfg = self.cfg
        resuming = self.position.task == task and self.position.task_started
        num_batches = self._batches(train_set, task, 0).num_batches
        if not resuming:
            self._start_task(task, cfg.optim.epochs * num_batches)
        class_range = self.scenario.class_range(task)
        frozen_epochs = cfg.optim.peft_frozen_epochs if task > 0 else 0
        show_bar = cfg.run.progress and distributed.is_main()
        with ak.utils.progress_bar(
            cfg.optim.epochs * num_batches,
            show_bar,
            initial=self.position.epoch * num_batches + self.position.batch,
            desc=f"task {task + 1}/{self.scenario.num_tasks}",
            unit="step",
            leave=False,
        ) as bar:
            for epoch in range(self.position.epoch, cfg.optim.epochs):
                peft_trainable = epoch >= frozen_epochs
                self.model.set_peft_trainable(peft_trainable)
                if epoch in (0, frozen_epochs) and self.position.batch == 0:
                    self.log(
                        f"task {task} epoch {epoch}: {self.model.num_trainable_parameters()} trainable "
                        f"parameters{'' if peft_trainable else ' (PEFT frozen)'}"
                    )
                stats = self._train_epoch(task, epoch, train_set, class_range, bar)
                self.history.append({"task": task, "epoch": epoch, "peft_trainable": peft_trainable, **stats})
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4f}")
                self.position = Position(task, epoch + 1)
        self.model.set_peft_trainable(True)
        self.trainable_per_task.append(self.model.num_trainable_parameters())  # PEFT + this task's head

    def _start_task(self, task: int, total_steps: int) -> None:
        """The task's new head (seeded by the task), a fresh optimizer, the alpha schedule reset."""
        self._seed("head", task)
        class_range = self.model.add_task(self.scenario.task_sizes[task])
        assert class_range == self.scenario.class_range(task), "heads and scenario disagree on the class layout"
        self.optimizer = self._build_optimizer()
        if self.schedule is not None:
            # Assumption (the paper does not say): alpha spans all epochs of the task, head-only ones included.
            self.schedule.reset(total_steps)
        self.position = Position(task)

    def _train_epoch(self, task: int, epoch: int, train_set: Dataset, class_range, bar) -> Dict[str, float]:
        self.model.train()
        batches = self._batches(train_set, task, epoch, start=self.position.batch)
        samples = SeededSamples(train_set, self.cfg.run.seed, "sample", task, epoch)
        loader = self._loader(samples, batch_sampler=batches, collate_fn=collate_or_none)
        trained = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        # Sums over this rank's rows stay on the device: no host synchronisation per step.
        totals = torch.zeros(len(EPOCH_MEANS), device=self.device)
        if self._resumed_totals is not None:
            totals += self._resumed_totals.to(self.device)
            self._resumed_totals = None
        for batch, data in enumerate(loader, start=batches.start):
            self._seed("step", task, epoch, batch, self.rank)
            rows = len(batches.share(batch))
            totals += self._train_step(data, class_range, trained, rows / batches.global_rows(batch))
            self.global_step += 1
            self.position = Position(task, epoch, batch + 1)
            bar.update()
            if self.cfg.run.checkpoint_every and self.global_step % self.cfg.run.checkpoint_every == 0:
                self.save_checkpoint(totals)
            if self._stop_at is not None and self.global_step >= self._stop_at:
                raise TrainingInterrupted(f"stopped after global step {self.global_step} (stop_after_steps)")
        means = (distributed.all_reduce_sum(totals) / len(train_set)).tolist()
        return dict(zip(EPOCH_MEANS, means, strict=True))

    def _train_step(self, data, class_range, trained: Sequence[torch.nn.Parameter], share: float) -> torch.Tensor:
        """One optimizer step; returns this rank's row-weighted sums of EPOCH_MEANS. `share` is
        this rank's fraction of the global batch (1 alone)."""
        alpha = self.schedule.alpha if self.schedule is not None else float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(EPOCH_MEANS), device=self.device)
        stats = None
        if data is not None:  # None: this rank's share of a short last batch is empty
            x, y = data[0].to(self.device, non_blocking=True), data[1].to(self.device, non_blocking=True)
            with ak.utils.bf16_autocast(self.device, self.cfg.run.bf16):
                logits = self.model(x)
            # bf16 logits go to the fused op as they are: it computes in fp32 internally.
            loss, stats = local_loss(self.criterion, logits, y, class_range, return_stats=True)
            loss.backward()
            n = len(y)
            sums = torch.stack(
                [
                    loss.detach().float() * n,
                    stats.entropy.sum(),
                    stats.sample_weight.sum(),
                    torch.as_tensor(alpha, dtype=torch.float32, device=self.device) * n,
                ]
            )
        distributed.all_reduce_gradients(trained, weight=share)
        self.optimizer.step()
        if self._feedback:
            self._observe(stats)
        if self.schedule is not None:
            self.schedule.step()
        return sums

    def _observe(self, stats) -> None:
        """Feeds the step's LossStats to a feedback schedule. Data parallel: the global batch's mean
        p_y (sums over ranks, one all_reduce), as one counted row, so every rank moves alpha alike."""
        if self.world_size == 1:
            self.schedule.observe(stats)
            return
        p_y = stats.p_target.detach().float().reshape(-1) if stats is not None else torch.zeros(0, device=self.device)
        counted = p_y > 0  # ignored rows have p_y = 0
        sums = distributed.all_reduce_sum(torch.stack([torch.where(counted, p_y, 0.0).sum(), counted.sum().float()]))
        mean = (sums[0] / sums[1].clamp(min=1)).reshape(1)
        self.schedule.observe(types.SimpleNamespace(p_target=mean), counted=(sums[1] > 0).reshape(1))

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, task: int, test_sets: List[Dataset]) -> List[float]:
        """Accuracy on each task seen so far, recorded in row `task` of the accuracy matrix. Each rank
        predicts every world_size-th sample; the (correct, total) counts are summed over ranks."""
        counts = torch.zeros(task + 1, 2, dtype=torch.int64, device=self.device)
        for i in range(task + 1):
            # Seeded as training samples are, in case a test transform draws random numbers.
            samples = SeededSamples(test_sets[i], self.cfg.run.seed, "test", i)
            shard = Subset(samples, range(self.rank, len(samples), self.world_size))
            if len(shard):
                loader = self._loader(shard, batch_size=self.cfg.data.eval_batch_size)
                preds, targets = predict_loader(self.model, loader, self.device)
                counts[i, 0], counts[i, 1] = int((preds == targets).sum()), len(targets)
        correct, total = distributed.all_reduce_sum(counts).cpu().T.tolist()
        accs = [c / t if t else math.nan for c, t in zip(correct, total, strict=True)]
        for i, acc in enumerate(accs):
            self.accuracy_matrix.record(task, i, acc)
        return accs

    # -- checkpoints ---------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        if self._backbone_fingerprint is None:  # the backbone is frozen: hash it once
            self._backbone_fingerprint = backbone_fingerprint(self.model, self.cfg.peft.freeze_backbone)
        return self._backbone_fingerprint

    def save_checkpoint(self, epoch_totals: Optional[torch.Tensor] = None) -> None:
        """Writes the run's state to run.output_dir (rank 0; every rank must call it: the partial
        epoch sums of all ranks are gathered)."""
        partials = None
        if epoch_totals is not None:
            partials = torch.stack(distributed.all_gather_object(epoch_totals.detach().cpu()))
        if distributed.is_main():
            save_checkpoint(checkpoint_path(self.cfg.run.output_dir), self._state(partials))

    def _state(self, epoch_totals: Optional[torch.Tensor]) -> TrainerState:
        mid_task = self.position.task_started
        return TrainerState(
            config=config_to_dict(self.cfg),
            scenario=self.scenario.state_dict(),
            backbone_fingerprint=self._fingerprint(),
            world_size=self.world_size,
            position=self.position,
            global_step=self.global_step,
            num_heads=len(self.model.heads.heads),
            model=trained_state(self.model, self.cfg.peft.freeze_backbone),
            accuracy_matrix=self.accuracy_matrix.state_dict(),
            history=self.history,
            trainable_per_task=self.trainable_per_task,
            timing=self.timing,
            optimizer=self.optimizer.state_dict() if mid_task else None,
            schedule=self.schedule.state_dict() if mid_task and self.schedule is not None else None,
            epoch_totals=epoch_totals,
            task_seconds=time.perf_counter() - self._task_clock if mid_task else 0.0,
        )

    def resume(self) -> bool:
        """Restores the run from run.output_dir's checkpoint if there is one; True if it did."""
        path = checkpoint_path(self.cfg.run.output_dir)
        state = load_checkpoint(path)
        if state is None:
            return False
        state.check_resumable(config_to_dict(self.cfg), self.scenario.state_dict(), self._fingerprint(), path)
        if len(self.model.heads.heads):
            raise ResumeError(
                f"resuming from {path} needs a model without heads (the checkpoint rebuilds them), "
                f"got {len(self.model.heads.heads)}"
            )
        self._restore(state)
        p = self.position
        self.log(f"resumed from {path}: task {p.task} epoch {p.epoch} batch {p.batch} (step {self.global_step})")
        return True

    def _restore(self, state: TrainerState) -> None:
        for task in range(state.num_heads):
            self.model.add_task(self.scenario.task_sizes[task])
        load_trained_state(self.model, state.model)
        self.position, self.global_step = state.position, state.global_step
        self.accuracy_matrix.load_state_dict(state.accuracy_matrix)
        self.history, self.timing, self.trainable_per_task = state.history, state.timing, state.trainable_per_task
        if state.optimizer is not None:
            self.optimizer = self._build_optimizer()
            self.optimizer.load_state_dict(state.optimizer)
        if state.schedule is not None:
            self.schedule.load_state_dict(state.schedule)
        self._resumed_totals = state.epoch_totals_of(self.rank, self.world_size)
        self._task_clock = time.perf_counter() - state.task_seconds

    # -- the run -------------------------------------------------------------------------------

    def fit(
        self, train_set: Dataset, train_targets, test_set: Dataset, test_targets, stop_after_steps: Optional[int] = None
    ) -> Dict[str, object]:
        """Runs every task (resuming first when run.resume and a checkpoint exists); returns the
        metric summary with the class order, per-epoch history and seconds per task.
        `stop_after_steps`: raise TrainingInterrupted after that many optimizer steps (tests)."""
        if self.cfg.run.resume:
            self.resume()
        self._stop_at = None if stop_after_steps is None else self.global_step + stop_after_steps
        train_sets = task_subsets(self.scenario, train_set, train_targets)
        test_sets = task_subsets(self.scenario, test_set, test_targets)
        for task in range(self.position.task, self.scenario.num_tasks):
            if not self.position.task_started:
                self._task_clock = time.perf_counter()
            self.train_task(task, train_sets[task])
            accs = self.evaluate(task, test_sets)
            self.timing.append(time.perf_counter() - self._task_clock)
            self.log(f"task {task}: accuracy per task {[round(a, 4) for a in accs]} ({self.timing[-1]:.1f} s)")
            self.position = Position(task + 1)
            self.optimizer = None
            self.save_checkpoint()
        return {
            **self.accuracy_matrix.summary(),
            "scenario": self.scenario.state_dict(),
            "trainable_parameters_per_task": self.trainable_per_task,
            "history": self.history,
            "timing": self.timing,
        }

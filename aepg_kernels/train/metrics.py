"""Continual-learning metrics from the accuracy matrix.

R[t][i] is the accuracy on task i's test set after training on tasks 0..t (entries with i > t are
not measured and ignored). Every metric is a mean over tasks (each task weighs the same, whatever
the size of its test set), in the unit of R (fractions or percent).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence


def _square(R: Sequence[Sequence[float]]) -> int:
    T = len(R)
    if T == 0 or any(len(row) < T for row in R):
        raise ValueError(f"R must be a T x T matrix (T >= 1), got rows of lengths {[len(row) for row in R]}")
    return T


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def accuracy_after_each_task(R: Sequence[Sequence[float]]) -> List[float]:
    """A_t = (1 / (t+1)) sum_{i <= t} R[t][i]: the mean accuracy over the tasks seen after task t."""
    T = _square(R)
    return [_mean([R[t][i] for i in range(t + 1)]) for t in range(T)]


def final_accuracy(R: Sequence[Sequence[float]]) -> float:
    """A_T = (1 / T) sum_i R[T-1][i]: the mean accuracy over all tasks after the last task."""
    return accuracy_after_each_task(R)[-1]


def average_incremental_accuracy(R: Sequence[Sequence[float]]) -> float:
    """(1 / T) sum_t A_t: the mean of the accuracy after each task (A_t above)."""
    return _mean(accuracy_after_each_task(R))


def forgetting(R: Sequence[Sequence[float]]) -> float:
    """Max-based forgetting (Chaudhry et al., 2018): the mean over old tasks i < T-1 of
    max_{i <= t < T-1} R[t][i] - R[T-1][i], the drop from the best earlier accuracy on task i to
    the final one. NaN for a single task (no old task)."""
    T = _square(R)
    return _mean([max(R[t][i] for t in range(i, T - 1)) - R[T - 1][i] for i in range(T - 1)])


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): the mean over old tasks i < T-1 of R[T-1][i] - R[i][i], the
    change from just after learning task i to the end (negative: forgetting). NaN for a single task."""
    T = _square(R)
    return _mean([R[T - 1][i] - R[i][i] for i in range(T - 1)])


def summarize(R: Sequence[Sequence[float]]) -> Dict[str, object]:
    """Every metric under its name, plus the matrix itself (for a JSON summary)."""
    return {
        "accuracy_matrix": [list(map(float, row)) for row in R],
        "accuracy_after_each_task": accuracy_after_each_task(R),
        "final_accuracy": final_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting_max_based": forgetting(R),
        "backward_transfer": backward_transfer(R),
    }


class AccuracyMatrix:
    """R filled in as a run goes: `record(t, i, acc)` after training task t; metrics over the
    tasks trained so far (`rows`)."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.values = [[math.nan] * num_tasks for _ in range(num_tasks)]
        self.rows = 0

    def record(self, task: int, eval_task: int, accuracy: float) -> None:
        if not 0 <= eval_task <= task < self.num_tasks:
            raise IndexError(f"need 0 <= eval_task <= task < {self.num_tasks}, got task={task}, eval_task={eval_task}")
        self.values[task][eval_task] = float(accuracy)
        self.rows = max(self.rows, task + 1)

    def trained(self) -> List[List[float]]:
        """The square matrix of the tasks trained so far."""
        return [row[: self.rows] for row in self.values[: self.rows]]

    def summary(self) -> Dict[str, object]:
        return summarize(self.trained())

    def state_dict(self) -> dict:
        return {"values": [row[:] for row in self.values], "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.values = [row[:] for row in state["values"]]
        self.num_tasks, self.rows = len(self.values), state["rows"]

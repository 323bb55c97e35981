import math

import pytest

from aepg_kernels.train import (
    AccuracyMatrix,
    accuracy_after_each_task,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    summarize,
)

NAN = math.nan
# R[t][i]: accuracy on task i after training task t (upper triangle not measured).
R = [
    [90, NAN, NAN],
    [70, 80, NAN],
    [60, 75, 85],
]


def test_accuracy_after_each_task():
    assert accuracy_after_each_task(R) == [90, 75, pytest.approx(220 / 3)]


def test_final_and_average_incremental_accuracy():
    assert final_accuracy(R) == pytest.approx(220 / 3)
    assert average_incremental_accuracy(R) == pytest.approx((90 + 75 + 220 / 3) / 3)


def test_forgetting_is_max_based():
    # Task 0 peaked at 90 (after task 0), task 1 at 80: ((90 - 60) + (80 - 75)) / 2.
    assert forgetting(R) == 17.5
    # The peak need not be on the diagonal: task 0 improves to 95 after task 1.
    assert forgetting([[90, NAN, NAN], [95, 80, NAN], [60, 75, 85]]) == 20.0


def test_backward_transfer():
    assert backward_transfer(R) == ((60 - 90) + (75 - 80)) / 2
    assert backward_transfer([[50, NAN], [60, 70]]) == 10  # positive: learning task 1 helped task 0


def test_single_task():
    assert final_accuracy([[42.0]]) == average_incremental_accuracy([[42.0]]) == 42.0
    assert math.isnan(forgetting([[42.0]])) and math.isnan(backward_transfer([[42.0]]))


def test_accuracy_matrix_and_summary():
    m = AccuracyMatrix(3)
    for t in range(2):
        for i in range(t + 1):
            m.record(t, i, R[t][i])
    (row0, row1) = m.trained()
    assert row0[0] == 90 and math.isnan(row0[1]) and row1 == [70, 80]
    assert m.summary()["final_accuracy"] == 75
    for i in range(3):
        m.record(2, i, R[2][i])
    s = m.summary()
    assert s["forgetting_max_based"] == 17.5 and s["backward_transfer"] == -17.5
    assert s == {**summarize(R), "accuracy_matrix": s["accuracy_matrix"]}
    with pytest.raises(IndexError):
        m.record(0, 1, 50.0)

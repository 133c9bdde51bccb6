import numpy as np
import pytest

from xdc_fast.metrics import cluster_quality, hungarian_accuracy, purity


def test_perfect_clustering_under_renaming():
    labels = np.array([0, 0, 1, 1, 2, 2])
    clusters = np.array([5, 5, 3, 3, 9, 9])
    assert cluster_quality(clusters, labels) == {"nmi": 1.0, "ari": 1.0, "purity": 1.0, "hungarian_acc": 1.0}


def test_purity_and_hungarian_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    clusters = np.array([0, 0, 1, 1, 1, 1])  # cluster 1 holds one 0 and three 1s
    assert purity(clusters, labels) == pytest.approx(5 / 6)
    assert hungarian_accuracy(clusters, labels) == pytest.approx(5 / 6)
    # One big cluster: purity is the majority share, Hungarian can match it to one label only.
    assert purity(np.zeros(6, int), labels) == pytest.approx(0.5)
    assert hungarian_accuracy(np.zeros(6, int), labels) == pytest.approx(0.5)


def test_mean_average_precision_by_hand():
    from xdc_fast.metrics import mean_average_precision

    # Class 0 ranks its positives 1st and 3rd: AP = (1/1 + 2/3) / 2. Class 1 ranks its one positive 2nd: AP = 1/2.
    # Class 2 has no positive test item: AP is undefined there, so it is left out of the mean.
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.2], [0.7, 0.9, 0.4], [0.6, 0.3, 0.9]])
    truth = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    value, classes = mean_average_precision(truth, scores)
    assert classes == 2
    assert value == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)


def test_mean_average_precision_without_any_positive_is_an_error():
    from xdc_fast.errors import XdcError
    from xdc_fast.metrics import mean_average_precision

    with pytest.raises(XdcError, match="no test item carries any label"):
        mean_average_precision(np.zeros((3, 2), bool), np.ones((3, 2)))

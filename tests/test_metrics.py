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

"""Clustering and classification metrics, on scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def nmi(a, b) -> float:
    return float(normalized_mutual_info_score(_np(a), _np(b)))


def ari(a, b) -> float:
    return float(adjusted_rand_score(_np(a), _np(b)))


def purity(clusters, labels) -> float:
    """Share of items whose cluster's most common true label is their own."""
    clusters, labels = _np(clusters), _np(labels)
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(labels[clusters == c]).max()
    return float(total / len(labels))


def hungarian_accuracy(clusters, labels) -> float:
    """Accuracy under the best one-to-one matching of clusters to labels."""
    clusters, labels = _np(clusters), _np(labels)
    cu, ci = np.unique(clusters, return_inverse=True)
    lu, li = np.unique(labels, return_inverse=True)
    table = np.zeros((len(cu), len(lu)), dtype=np.int64)
    np.add.at(table, (ci, li), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(labels))


def cluster_quality(clusters, labels) -> dict:
    return {"nmi": nmi(clusters, labels), "ari": ari(clusters, labels), "purity": purity(clusters, labels),
            "hungarian_acc": hungarian_accuracy(clusters, labels)}

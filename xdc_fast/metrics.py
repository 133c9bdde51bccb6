"""Scores: clustering quality (on scikit-learn and scipy), clip/video classification accuracy, and the mean
average precision of multi-label classification."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, average_precision_score, normalized_mutual_info_score

from .errors import XdcError


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


# ---- classification ---------------------------------------------------------------------------------

def topk_correct(probabilities: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's label is among its ``k`` highest scores (ties broken by lower class index)."""
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def mean_per_video(rows: np.ndarray, video_of_row: np.ndarray, num_videos: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each video's rows (clip softmaxes or features), ``[num_videos, dim]``, and how many rows each
    video had; a video without rows gets NaN."""
    sums = np.zeros((num_videos, rows.shape[1]))
    np.add.at(sums, video_of_row, rows)
    counts = np.bincount(video_of_row, minlength=num_videos)
    with np.errstate(invalid="ignore"):
        return sums / counts[:, None], counts


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def score(probabilities: np.ndarray, video_of_clip: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Clip and video top-1/top-5 and the video-level confusion matrix (rows: true, columns: predicted).

    ``probabilities`` [clips, classes], ``video_of_clip`` [clips] (video index), ``labels`` [videos]. A
    video's prediction is its mean softmax over its clips; videos without any clip are left out."""
    clip_labels = labels[video_of_clip]
    per_video, counts = mean_per_video(probabilities, video_of_clip, len(labels))
    present = counts > 0
    per_video, video_labels = per_video[present], labels[present]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (video_labels, per_video.argmax(1)), 1)
    return {"clip_acc": float(topk_correct(probabilities, clip_labels, 1).mean()),
            "clip_top5": float(topk_correct(probabilities, clip_labels, 5).mean()),
            "video_acc": float(topk_correct(per_video, video_labels, 1).mean()),
            "video_top5": float(topk_correct(per_video, video_labels, 5).mean()),
            "num_test_videos": int(present.sum()), "num_test_clips": int(len(probabilities)),
            "confusion": confusion.tolist()}


def mean_average_precision(truth: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """mAP as AudioSet and VGGSound tables report it: scikit-learn's average precision of each class
    (``truth`` ``[items, classes]`` booleans, ``scores`` the same shape), averaged over the classes with at
    least one positive item (a class without one has no defined AP). Returns mAP and that class count."""
    present = np.asarray(truth, bool).any(axis=0)
    if not present.any():
        raise XdcError("no test item carries any label: there is no average precision to compute")
    value = average_precision_score(np.asarray(truth, bool)[:, present], np.asarray(scores)[:, present],
                                    average="macro")
    return float(value), int(present.sum())

"""The evaluation protocols of the video/audio self-supervised literature, on features already computed.

Each function takes numpy features (rows) and integer labels and returns ``{"scores": {...}, "params":
{...}}``: the numbers and every hyperparameter that produced them, so a result carries its protocol.
Nothing here encodes a clip; :mod:`xdc_fast.evaluate` encodes once and calls every protocol on the same
features.

- :func:`linear`: the linear probe of ``finetune --mode linear`` (logistic regression on standardised clip
  features, softmax averaged over a video's clips): clip and video accuracy, top-1/top-5 (XDC's tables).
- :func:`knn`: weighted k-NN on L2-normalised features, each neighbour voting ``exp(cos / T)`` for its
  class (InstDisc, DINO): top-1/top-5.
- :func:`retrieval`: each test item queries the training items by cosine similarity; Recall@k is the share
  of queries with at least one of the k nearest sharing their class (VCOP, SeLaVi and most video-SSL
  retrieval tables).
- :func:`svm`: a linear SVM on standardised clip features, C chosen by cross-validation over groups of the
  training items only (a video's clips never straddle folds), the decision function averaged over a
  recording's clips: video accuracy (the ESC-50/DCASE audio protocol).
- :func:`clustering`: k-means with k = number of classes on L2-normalised features: NMI, ARI, purity,
  Hungarian accuracy.
"""

from __future__ import annotations

import numpy as np
import torch

from . import metrics
from .errors import XdcError

SVM_CS = (0.001, 0.01, 0.1, 1.0, 10.0)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ranked(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities ``[test, train]`` and, per test row, the training rows from nearest to farthest
    (ties broken by the lower training index)."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise XdcError("a protocol needs at least one training and one test item with features")
    similarity = l2_normalise(test_x) @ l2_normalise(train_x).T
    return similarity, np.argsort(-similarity, axis=1, kind="stable")


def knn(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
        num_classes: int | None = None) -> dict:
    """Weighted k-NN: the ``k`` most similar training rows vote ``exp(cos / temperature)`` for their class."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    similarity, order = _ranked(train_x, test_x)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    used = min(k, len(train_y))
    top = order[:, :used]
    weights = np.exp(np.take_along_axis(similarity, top, axis=1) / temperature)
    votes = np.zeros((len(test_y), num_classes))
    np.add.at(votes, (np.repeat(np.arange(len(test_y)), used), train_y[top].ravel()), weights.ravel())
    return {"scores": {"top1": float(metrics.topk_correct(votes, test_y, 1).mean()),
                       "top5": float(metrics.topk_correct(votes, test_y, 5).mean()),
                       "num_test": int(len(test_y))},
            "params": {"k": k, "temperature": temperature, "features": "l2-normalised", "weights": "exp(cos/T)"}}


def retrieval(train_x, train_y, test_x, test_y, ks=(1, 5, 10, 20, 50)) -> dict:
    """Recall@k of test queries against training items (cosine similarity)."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _, order = _ranked(train_x, test_x)
    same = train_y[order] == test_y[:, None]  # [queries, ranked training items]
    scores = {f"recall@{k}": float(same[:, :k].any(axis=1).mean()) for k in ks}
    scores["num_queries"] = int(len(test_y))
    return {"scores": scores, "params": {"ks": list(ks), "similarity": "cosine",
                                         "hit": "any of the top k shares the query's class"}}


def _fit_svm(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    """A standardised linear SVM on ``x`` (every fit of :func:`svm`, cross-validation included, goes here)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=5000, random_state=seed)).fit(x, y)


def _decisions(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Decision values ``[rows, num_classes]``; classes absent from the fit never win."""
    raw = model.decision_function(x)
    classes = model.classes_
    if raw.ndim == 1:  # two classes: one margin, positive for classes_[1]
        raw = np.stack([-raw, raw], axis=1)
    out = np.full((len(x), num_classes), -1e9)
    out[:, classes] = raw
    return out


def select_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, cs=SVM_CS, folds: int = 3, seed: int = 0
             ) -> tuple[float, dict]:
    """The C of ``cs`` with the best mean held-out clip accuracy over group folds of the TRAINING rows given
    (groups = videos: a video's clips are all in one fold); the first wins a tie. Returns C and each C's
    score. With fewer than 2 groups there is nothing to validate on: C = 1."""
    from sklearn.model_selection import GroupKFold

    folds = min(folds, len(np.unique(groups)))
    if folds < 2:
        return 1.0, {}
    cv = {}
    for c in cs:
        accuracies = []
        for fit_rows, held_rows in GroupKFold(n_splits=folds).split(x, y, groups):
            if len(np.unique(y[fit_rows])) < 2:
                continue
            model = _fit_svm(x[fit_rows], y[fit_rows], c, seed)
            accuracies.append(float((model.predict(x[held_rows]) == y[held_rows]).mean()))
        cv[c] = float(np.mean(accuracies)) if accuracies else float("nan")
    valid = {c: s for c, s in cv.items() if not np.isnan(s)}
    return (max(valid, key=lambda c: (valid[c], -cs.index(c))) if valid else 1.0), cv


def svm(train_x, train_y, train_groups, test_x, test_y, test_video_of_clip, num_classes: int | None = None,
        cs=SVM_CS, folds: int = 3, seed: int = 0) -> dict:
    """Linear SVM on clip features. ``train_y``/``train_groups``: per training clip (groups = its video);
    ``test_y``: per test video; ``test_video_of_clip``: each test clip's video. A video's prediction is the
    argmax of its clips' mean decision values."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, train_groups, test_y = np.asarray(train_y), np.asarray(train_groups), np.asarray(test_y)
    test_video_of_clip = np.asarray(test_video_of_clip)
    if len(np.unique(train_y)) < 2:
        raise XdcError("the SVM needs training items of at least two classes")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    c, cv = select_c(train_x, train_y, train_groups, cs, folds, seed)
    model = _fit_svm(train_x, train_y, c, seed)
    decisions = _decisions(model, test_x, num_classes)
    per_video, counts = metrics.mean_per_video(decisions, test_video_of_clip, len(test_y))
    present = counts > 0
    clip_labels = test_y[test_video_of_clip]
    return {"scores": {"video_acc": float((per_video[present].argmax(1) == test_y[present]).mean()),
                       "clip_acc": float((decisions.argmax(1) == clip_labels).mean()),
                       "num_test_videos": int(present.sum())},
            "params": {"C": c, "cs": list(cs), "cv_folds": folds, "cv": "GroupKFold over training videos only",
                       "cv_accuracy": {str(k): v for k, v in cv.items()}, "standardised": True,
                       "aggregation": "mean decision value over a video's clips"}}


def clustering(x, y, k: int | None = None, nredo: int = 5, niter: int = 20, seed: int = 0) -> dict:
    """k-means (k = number of classes by default) on L2-normalised features, scored against ``y``."""
    from .cluster import KMeans

    y = np.asarray(y)
    k = k or len(np.unique(y))
    if len(y) < k:
        raise XdcError(f"clustering needs at least k={k} items, got {len(y)}")
    points = torch.from_numpy(l2_normalise(x).astype(np.float32))
    model = KMeans(points.shape[1], k, niter=niter, nredo=nredo, seed=seed).fit(points)
    scores = metrics.cluster_quality(model.labels.cpu().numpy(), y)
    return {"scores": {**scores, "num_items": int(len(y))},
            "params": {"k": k, "nredo": nredo, "niter": niter, "seed": seed, "features": "l2-normalised"}}


def linear(train_x, train_y, test_x, test_y, test_video_of_clip, num_classes: int, c: float = 1.0,
           seed: int = 0) -> dict:
    """The linear probe of ``finetune --mode linear``: ``train_y`` per training clip, ``test_y`` per test
    video, softmax averaged over a video's clips."""
    from .transfer import linear_classifier

    head = linear_classifier(np.asarray(train_x, np.float32), np.asarray(train_y), num_classes, c, seed)
    with torch.no_grad():
        logits = head(torch.from_numpy(np.asarray(test_x, np.float32))).numpy()
    scores = metrics.score(metrics.softmax(logits), np.asarray(test_video_of_clip), np.asarray(test_y), num_classes)
    scores.pop("confusion")
    return {"scores": scores, "params": {"C": c, "model": "logistic regression on standardised clip features",
                                         "aggregation": "mean softmax over a video's clips", "seed": seed}}


PROTOCOLS = ("linear", "knn", "retrieval", "svm", "clustering")
HEADLINE = {"linear": "video_acc", "knn": "top1", "retrieval": "recall@1", "svm": "video_acc",
            "clustering": "nmi"}

__all__ = ["knn", "retrieval", "svm", "select_c", "clustering", "linear", "PROTOCOLS", "HEADLINE"]

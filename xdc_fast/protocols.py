"""The evaluation protocols of the video/audio self-supervised literature, on features already computed.

Each function takes numpy features (rows) and integer labels and returns ``{"scores": {...}, "params":
{...}}``: the numbers and every hyperparameter that produced them, so a result carries its protocol; a
protocol that chooses a hyperparameter on the training items adds ``"selected": {...}`` (the SVM's C).
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
- :func:`multilabel_linear`: for multi-label data (VGGSound, AudioSet), one-vs-rest logistic regression
  scored by mAP (the tables of those datasets); :func:`retrieval` also takes label sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

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
    from . import metrics

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
    """Recall@k of test queries against training items (cosine similarity). Labels are class indices, or
    ``[items, classes]`` booleans for multi-label data, where a hit shares at least one class."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _, order = _ranked(train_x, test_x)
    if train_y.ndim == 2:
        shares = (test_y.astype(np.float32) @ train_y.T.astype(np.float32)) > 0  # [queries, training items]
        same, hit = np.take_along_axis(shares, order, axis=1), "any of the top k shares a class with the query"
    else:
        same, hit = train_y[order] == test_y[:, None], "any of the top k shares the query's class"
    scores = {f"recall@{k}": float(same[:, :k].any(axis=1).mean()) for k in ks}
    scores["num_queries"] = int(len(test_y))
    return {"scores": scores, "params": {"ks": list(ks), "similarity": "cosine", "hit": hit}}


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
    from . import metrics

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
            "params": {"cs": list(cs), "cv_folds": folds, "cv": "GroupKFold over training videos only",
                       "standardised": True, "aggregation": "mean decision value over a video's clips"},
            # What the training data chose, apart from the settings: two encoders scored by the same protocol
            # may choose different values, so these are no part of the protocol's fingerprint.
            "selected": {"C": c, "cv_accuracy": {str(k): v for k, v in cv.items()}}}


def clustering(x, y, k: int | None = None, nredo: int = 5, niter: int = 20, seed: int = 0) -> dict:
    """k-means (k = number of classes by default) on L2-normalised features, scored against ``y``."""
    from . import metrics

    import torch

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
    from . import metrics

    import torch

    head = linear_classifier(np.asarray(train_x, np.float32), np.asarray(train_y), num_classes, c, seed)
    with torch.no_grad():
        logits = head(torch.from_numpy(np.asarray(test_x, np.float32))).numpy()
    scores = metrics.score(metrics.softmax(logits), np.asarray(test_video_of_clip), np.asarray(test_y), num_classes)
    scores.pop("confusion")
    return {"scores": scores, "params": {"C": c, "model": "logistic regression on standardised clip features",
                                         "aggregation": "mean softmax over a video's clips", "seed": seed}}


def multilabel_linear(train_x, train_y, test_x, test_y, test_video_of_clip, c: float = 1.0, seed: int = 0) -> dict:
    """The linear probe of multi-label data: one logistic regression per class (one-vs-rest) on standardised
    clip features, a video's score per class the mean probability over its clips, scored by mAP over the
    classes with a positive test video. ``train_y``: ``[training clips, classes]`` booleans; ``test_y``:
    ``[test videos, classes]``. A scored class without both positive and negative training clips gets a
    constant score (its share of positive training clips): it ranks nothing, so its AP is its prevalence."""
    from . import metrics

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_y, test_y = np.asarray(train_y, bool), np.asarray(test_y, bool)
    test_video_of_clip = np.asarray(test_video_of_clip)
    if len(train_x) == 0 or len(test_x) == 0:
        raise XdcError("the probe needs at least one training and one test clip with features")
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    scaler = StandardScaler().fit(train_x)
    train_z, test_z = scaler.transform(train_x), scaler.transform(test_x)
    clip_scores = np.zeros((len(test_z), test_y.shape[1]))
    scored = np.flatnonzero(test_y.any(axis=0))  # AP is only defined, and only averaged, for these
    untrained = 0
    for k in scored:
        positives = train_y[:, k]
        if positives.all() or not positives.any():
            clip_scores[:, k] = positives.mean()
            untrained += 1
            continue
        model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(train_z, positives)
        clip_scores[:, k] = model.predict_proba(test_z)[:, 1]
    per_video, counts = metrics.mean_per_video(clip_scores, test_video_of_clip, len(test_y))
    present = counts > 0
    video_map, classes = metrics.mean_average_precision(test_y[present], per_video[present])
    clip_map, _ = metrics.mean_average_precision(test_y[test_video_of_clip], clip_scores)
    return {"scores": {"map": video_map, "clip_map": clip_map, "num_test_videos": int(present.sum()),
                       "num_classes_scored": classes, "num_classes_without_training_contrast": untrained},
            "params": {"C": c, "model": "one-vs-rest logistic regression on standardised clip features",
                       "aggregation": "mean probability over a video's clips",
                       "score": "mAP: average precision per class, macro over classes with a positive test video",
                       "seed": seed}}


def linear_classifier(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int, c: float,
                      seed: int):
    """A logistic regression on standardised features, folded into one ``nn.Linear`` on raw features
    (so the saved model of ``finetune --mode linear`` is the encoder plus a layer, like a finetuned one)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(train_features) == 0:
        raise XdcError("no training clip could be decoded (see the warnings above): there is nothing to fit")
    if len(np.unique(train_labels)) < 2:
        raise XdcError(f"the training videos hold a single class ({int(train_labels[0])}); a classifier needs at "
                       "least two (use a dataset, or split, with more classes)")
    scaler = StandardScaler().fit(train_features)
    model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    model.fit(scaler.transform(train_features), train_labels)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # scikit-learn keeps one row for two classes: logits (0, z) give the same softmax
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, train_features.shape[1]))
    bias = np.full(num_classes, -1e4)  # classes absent from training never win
    weight[model.classes_] = coef / scaler.scale_
    bias[model.classes_] = intercept - (coef * scaler.mean_ / scaler.scale_).sum(1)
    layer = torch.nn.Linear(train_features.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


# ---- the table of protocols ----------------------------------------------------------------------------

@dataclass
class Features:
    """One split's features as every protocol takes them: clip rows (``*_x``, each clip's video ``*_v``)
    and one mean row per video with at least one clip (``*_mean``, its label ``*_y``); ``*_labels`` are
    per video of the split (class indices, or ``[videos, classes]`` booleans for multi-label data)."""

    train_x: np.ndarray
    train_v: np.ndarray
    train_labels: np.ndarray
    test_x: np.ndarray
    test_v: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    seed: int  # of the solvers (logistic regression, SVM)
    kmeans_seed: int

    def __post_init__(self):
        from .metrics import mean_per_video

        train_mean, train_n = mean_per_video(self.train_x, self.train_v, len(self.train_labels))
        test_mean, test_n = mean_per_video(self.test_x, self.test_v, len(self.test_labels))
        self.train_mean, self.train_y = train_mean[train_n > 0], self.train_labels[train_n > 0]
        self.test_mean, self.test_y = test_mean[test_n > 0], self.test_labels[test_n > 0]


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: what it runs on a split's :class:`Features` with the evaluate settings,
    the metric a table shows, and its reading on multi-label data (None: it has none and is refused)."""

    name: str
    summary: str  # for --help
    headline: str
    run: Callable[[Features, object], dict] | None  # None: trains the encoder itself (evaluate runs it)
    multilabel: Callable[[Features, object], dict] | None = None
    default: bool = True  # run when no --protocol is given

    @property
    def on_features(self) -> bool:
        return self.run is not None


PROTOCOLS = {p.name: p for p in (
    Protocol("linear", "logistic regression on clip features (a multi-label dataset: one-vs-rest, scored by mAP)",
             "video_acc",
             lambda f, s: linear(f.train_x, f.train_labels[f.train_v], f.test_x, f.test_labels, f.test_v,
                                 f.num_classes, s.linear_c, f.seed),
             lambda f, s: multilabel_linear(f.train_x, f.train_labels[f.train_v], f.test_x, f.test_labels, f.test_v,
                                            s.linear_c, f.seed)),
    Protocol("knn", "weighted k-NN on mean video features", "top1",
             lambda f, s: knn(f.train_mean, f.train_y, f.test_mean, f.test_y, s.knn_k, s.knn_temperature,
                              f.num_classes)),
    Protocol("retrieval", "Recall@k of test videos querying training videos", "recall@1",
             lambda f, s: retrieval(f.train_mean, f.train_y, f.test_mean, f.test_y),
             lambda f, s: retrieval(f.train_mean, f.train_y, f.test_mean, f.test_y)),
    Protocol("svm", "linear SVM on clip features, C by group cross-validation", "video_acc",
             lambda f, s: svm(f.train_x, f.train_labels[f.train_v], f.train_v, f.test_x, f.test_labels, f.test_v,
                              f.num_classes, folds=s.svm_folds, seed=f.seed)),
    Protocol("clustering", "k-means with k = classes on mean video features: NMI, ARI, purity", "nmi",
             lambda f, s: clustering(np.concatenate([f.train_mean, f.test_mean]),
                                     np.concatenate([f.train_y, f.test_y]), seed=f.kmeans_seed)),
    Protocol("finetune", "full finetuning, trained per checkpoint and split: never a default", "video_acc",
             None, default=False),
)}


# Functions, not constants: a protocol registered after this module is imported still shows.
def default_protocols() -> tuple[str, ...]:
    return tuple(name for name, p in PROTOCOLS.items() if p.default)


def protocols_help() -> str:
    return "Protocols to run on the same features: " + "; ".join(f"{p.name}: {p.summary}" for p in PROTOCOLS.values()) + "."


def multilabel_names() -> tuple[str, ...]:
    """The protocols that have a reading on multi-label data (VGGSound, AudioSet)."""
    return tuple(name for name, p in PROTOCOLS.items() if p.multilabel is not None)


def headline(protocol: str, scores: dict) -> str:
    """The metric a table shows for a result: mAP for the multi-label probe, else the protocol's own."""
    return "map" if "map" in scores else PROTOCOLS[protocol].headline


def run_protocol(name: str, features: Features, settings) -> dict:
    """Protocol ``name`` on one split's features, with the evaluate ``settings`` it reads."""
    protocol = PROTOCOLS[name]
    multilabel = features.train_labels.ndim == 2
    runner = protocol.multilabel if multilabel else protocol.run
    if runner is None:
        raise XdcError(f"protocol {name} has no reading on " + ("multi-label data" if multilabel else "features"))
    return runner(features, settings)


__all__ = ["knn", "retrieval", "svm", "select_c", "clustering", "linear", "multilabel_linear", "linear_classifier",
           "headline", "Features", "Protocol", "PROTOCOLS", "default_protocols", "protocols_help", "multilabel_names", "run_protocol"]

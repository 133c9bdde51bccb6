"""Linear probe of a frozen encoder: features of uniformly spaced clips, then a linear classifier.

The standard cheap check of a representation (REFERENCE §3). Clip accuracy scores every clip on its
own; video accuracy averages the softmax over a video's clips first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ProbeResult:
    clip_acc: float
    video_acc: float
    num_test_videos: int


def video_accuracy(probabilities: np.ndarray, video_of_clip: np.ndarray, labels: np.ndarray) -> float:
    """Share of videos whose mean softmax over their clips peaks at their label.

    ``probabilities`` [clips, classes], ``video_of_clip`` [clips] (video index), ``labels`` [videos]."""
    videos = np.unique(video_of_clip)
    correct = 0
    for v in videos:
        mean = probabilities[video_of_clip == v].mean(axis=0)
        correct += int(mean.argmax() == labels[v])
    return correct / len(videos)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask with ``test_fraction`` of every class (at least one), seeded."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: max(1, int(round(test_fraction * len(members))))]] = True
    return test


def extract_features(encoder: torch.nn.Module, dataset, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(features [clips, d], video index of each clip) for an evaluation ClipDataset."""
    from .data.dataset import collate_clips

    encoder.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_clips)
    modality = dataset.modalities[0]
    features, videos = [], []
    with torch.no_grad():
        for batch in loader:
            if "index" not in batch:
                continue
            features.append(encoder(batch[modality]).float().numpy())
            videos.append(batch["index"].numpy() // dataset.config.eval_clips)
    return np.concatenate(features), np.concatenate(videos)


def linear_probe(encoder: torch.nn.Module, dataset: str | Path, modality: str, clip_config, seed: int = 0,
                 test_fraction: float = 0.3) -> ProbeResult:
    """Features of ``clip_config.eval_clips`` clips per video, a logistic regression on the training
    videos' clips, and clip- and video-level accuracy on the test videos (a seeded stratified split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from .data.dataset import ClipDataset

    data = ClipDataset(dataset, clip_config, train=False, modalities=(modality,))
    labels = np.array([r["label"] for r in data.items])
    features, video_of_clip = extract_features(encoder, data)
    test_video = stratified_split(labels, test_fraction, seed)
    test_clip = test_video[video_of_clip]
    scaler = StandardScaler().fit(features[~test_clip])
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(features[~test_clip]),
                                                        labels[video_of_clip[~test_clip]])
    probabilities = classifier.predict_proba(scaler.transform(features[test_clip]))
    predicted = classifier.classes_[probabilities.argmax(1)]
    clip_acc = float((predicted == labels[video_of_clip[test_clip]]).mean())
    # predict_proba's columns follow classifier.classes_; map them back to label values.
    full = np.zeros((len(probabilities), labels.max() + 1))
    full[:, classifier.classes_] = probabilities
    return ProbeResult(clip_acc, video_accuracy(full, video_of_clip[test_clip], labels), int(test_video.sum()))

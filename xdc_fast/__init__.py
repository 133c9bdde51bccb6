"""xdc-fast: cross-modal deep clustering (XDC) of video and audio, with fast batched k-means."""

from .checkpoint import load_encoder
from .cluster import KMeans, pca_whiten
from .ops import kmeans_assign, kmeans_update

__version__ = "0.1.0"
__all__ = ["KMeans", "pca_whiten", "kmeans_assign", "kmeans_update", "load_encoder", "__version__"]

"""xdc-fast: cross-modal deep clustering (XDC) of video and audio, with fast batched k-means.

The names below load torch and the compiled kernels on first use, not on ``import xdc_fast``: the
command line's ``--help`` and its checks of flags import the package without them.
"""

__version__ = "0.1.0"

_EXPORTS = {"KMeans": "cluster", "pca_whiten": "cluster", "kmeans_assign": "ops", "kmeans_update": "ops",
            "load_encoder": "checkpoint"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_EXPORTS, "__version__"]

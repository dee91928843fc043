"""kakeya-mlx engine: model loading, sink+window session caches, decoding on one compute thread."""

__version__ = "0.1.0"

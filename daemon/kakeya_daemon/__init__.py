"""kakeya-mlx daemon: serves one model to local clients over a Unix socket (`kakeya serve`)."""

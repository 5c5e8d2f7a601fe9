"""The run directory: atomic files, checkpoints on disk, the manifest, the lock, the metric log, model files, run layout."""

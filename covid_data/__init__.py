"""Data half of the retraining pipeline: store, fetch, manifest, validation, split."""

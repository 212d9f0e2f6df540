"""Prefect flows of the retraining pipeline."""

import tasks.prefect_env  # noqa: F401  (must precede the Prefect import)

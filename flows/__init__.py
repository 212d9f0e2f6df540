"""Prefect flows of the retraining pipeline."""

import covid_data.prefect_env  # noqa: F401  (must precede the Prefect import)

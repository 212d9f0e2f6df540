"""Prefect tasks: thin wrappers over the plain functions in covid_data and covid_models."""

import tasks.prefect_env  # noqa: F401  (must precede the Prefect import)

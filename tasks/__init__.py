"""Prefect tasks: thin wrappers over the plain functions in covid_data and covid_models."""

import covid_data.prefect_env  # noqa: F401  (must precede the Prefect import)

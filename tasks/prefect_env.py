"""Environment defaults that must be in place before Prefect is imported."""

import logging
import os

# Show the plain library modules' log lines in the Prefect UI beside the task logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "covid_data,covid_models,covid_eval,covid_registry,covid_app")
# These machines (and many clusters) have no route to Prefect's telemetry endpoint.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A run without PREFECT_API_URL starts a temporary server; in a fresh Prefect home it first
# migrates its SQLite database, which takes longer than Prefect's 20 s default on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) is noise in task logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _name in ("covid_data", "covid_models"):
    logging.getLogger(_name).setLevel(logging.INFO)

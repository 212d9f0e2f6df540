"""The task's run logger, or the module's logger when a task runs as a plain function (``.fn``)."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def task_logger(name: str):
    try:
        return get_run_logger()
    except MissingContextError:  # called as a plain function, e.g. explain_models.fn in a test
        return logging.getLogger(name)

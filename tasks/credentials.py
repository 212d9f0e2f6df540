"""Kaggle credentials from a Prefect Secret block: the orchestrator's side of the download.

``covid_data`` knows nothing of Prefect; the flows hand it :func:`prefect_secret_credentials`
as its credentials provider, consulted only when the kaggle client finds no credentials of
its own (environment, kaggle.json).
"""

from __future__ import annotations

import json
import logging

from covid_data.kaggle_download import CredentialsProvider, KaggleAuthError, KaggleCredentials

log = logging.getLogger(__name__)

DEFAULT_SECRET_BLOCK = "kaggle-credentials"


def secret_block_credentials(block_name: str = DEFAULT_SECRET_BLOCK) -> KaggleCredentials | None:
    """The block's ``{"username": ..., "key": ...}``, or None when there is no such block (or no
    reachable Prefect API). A block of the wrong shape is an error: it was meant to be used."""
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(block_name, _sync=True).get()
    except Exception as e:  # no block, or no Prefect API reachable
        log.debug("no Prefect Secret block %r: %s", block_name, type(e).__name__)
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict) or not value.get("username") or not value.get("key"):
        raise KaggleAuthError(f"Prefect Secret block {block_name!r} must hold {{'username': ..., 'key': ...}}")
    return KaggleCredentials(
        username=str(value["username"]), key=str(value["key"]), origin=f"Prefect Secret block {block_name!r}"
    )


def prefect_secret_credentials(block_name: str | None = DEFAULT_SECRET_BLOCK) -> CredentialsProvider | None:
    """A provider that loads ``block_name`` lazily (None: no block is consulted)."""
    if not block_name:
        return None
    return lambda: secret_block_credentials(block_name)

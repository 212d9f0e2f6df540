"""Download a Kaggle dataset archive with the official ``kaggle`` client.

Credentials, in the client's own order: ``KAGGLE_API_TOKEN`` / ``KAGGLE_USERNAME`` +
``KAGGLE_KEY`` in the environment, ``~/.kaggle/kaggle.json`` (or ``$KAGGLE_CONFIG_DIR``);
then, if none is found, the caller's credentials provider (the flows pass one that reads a
Prefect Secret block, see ``tasks.credentials``; this package never imports Prefect); then
anonymous access, which Kaggle allows for public datasets. Keys are never logged.

The client skips the download when the archive in the cache folder is already as recent as
the remote one, so a second fetch of unchanged data downloads nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DATASET = "tawsifurrahman/covid19-radiography-database"


class KaggleDownloadError(RuntimeError):
    """The archive could not be downloaded."""


class KaggleAuthError(KaggleDownloadError):
    """Kaggle refused the credentials."""


@dataclass(frozen=True)
class KaggleCredentials:
    username: str
    key: str = field(repr=False)  # never in logs or reprs
    origin: str = "credentials provider"  # where they came from, for log lines and errors


# Called only when the client finds no credentials of its own; None means "none here either".
CredentialsProvider = Callable[[], KaggleCredentials | None]


@dataclass(frozen=True)
class Download:
    archive: Path
    downloaded: bool  # False when the cached archive was already up to date
    credentials: str  # where the credentials came from (never the key itself)


def _kaggle_api():
    # Importing the package runs authenticate() and prints help when no credentials
    # exist; that noise (and its SystemExit) is not ours to show.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi()


def _authenticate(api, credentials: CredentialsProvider | None) -> str:
    """Load credentials into ``api``; return where they came from."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.authenticate()
        user = api.config_values.get("username")
        src = "environment" if os.environ.get("KAGGLE_KEY") or os.environ.get("KAGGLE_API_TOKEN") else "kaggle.json"
        return f"{src} (user {user})" if user else src
    except SystemExit:
        pass  # the client found no credentials
    creds = credentials() if credentials else None
    if creds:
        api.config_values["username"] = creds.username
        api.config_values["key"] = creds.key
        return f"{creds.origin} (user {creds.username})"
    return "anonymous (public dataset)"


def download_dataset_archive(
    dataset: str,
    dest_dir: Path,
    *,
    credentials: CredentialsProvider | None = None,
) -> Download:
    """Download ``owner/slug[/version]`` as ``dest_dir/<slug>.zip`` unless already current.

    ``credentials`` is consulted only when the client finds none of its own."""
    import requests

    parts = dataset.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"Kaggle dataset must be 'owner/slug' or 'owner/slug/version', got {dataset!r}")
    slug = parts[1]
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / f"{slug}.zip"
    # The client rewrites (and re-times) the file only when it downloads: ctime tells.
    before = (archive.stat().st_ctime_ns, archive.stat().st_size) if archive.exists() else None

    api = _kaggle_api()
    creds = _authenticate(api, credentials)
    log.info("downloading Kaggle dataset %s with credentials from %s", dataset, creds)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.dataset_download_files(dataset, path=str(dest_dir), force=False, quiet=True, unzip=False)
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise KaggleAuthError(
                f"Kaggle refused access to dataset {dataset} (HTTP {status}) with credentials from {creds}; "
                "check KAGGLE_USERNAME/KAGGLE_KEY, ~/.kaggle/kaggle.json or the credentials provider "
                "(the flows' Prefect Secret block)"
            ) from None
        if status == 404:
            raise KaggleDownloadError(f"Kaggle dataset {dataset} was not found (HTTP 404)") from None
        raise KaggleDownloadError(f"downloading Kaggle dataset {dataset} failed: HTTP {status}: {e}") from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise KaggleDownloadError(f"the Kaggle API could not be reached for dataset {dataset}: {e}") from None
    except ValueError as e:  # the client's own size check after its retries
        raise KaggleDownloadError(f"download of Kaggle dataset {dataset} is incomplete: {e}") from None
    if not archive.exists():
        raise KaggleDownloadError(f"the Kaggle client reported no error but {archive} does not exist")
    after = (archive.stat().st_ctime_ns, archive.stat().st_size)
    downloaded = before != after
    if downloaded:
        log.info("downloaded %s (%.1f MB)", archive.name, archive.stat().st_size / 1e6)
    else:
        log.info("Kaggle dataset %s unchanged since the cached download: nothing downloaded", dataset)
    return Download(archive=archive, downloaded=downloaded, credentials=creds)

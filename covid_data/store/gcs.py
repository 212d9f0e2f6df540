"""The GCS backend: a ``gs://bucket/prefix`` location through ``google-cloud-storage``.

google-cloud-storage is imported where it is used, so importing the store stays light.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from covid_data.store.base import StoreUnavailableError
from covid_data.store.interface import Store


class GCSStore(Store):
    """A ``gs://bucket/prefix`` location through ``google-cloud-storage``.

    Honours ``STORAGE_EMULATOR_HOST`` (then no credentials are needed). Transient errors
    and an unreachable endpoint are retried with exponential backoff for up to
    ``retry_deadline`` seconds (``COVID_STORE_RETRY_DEADLINE``), then reported as
    :class:`StoreUnavailableError` naming the bucket and endpoint.
    """

    def __init__(self, uri: str, *, retry_deadline: float | None = None, client=None):
        from google.api_core.retry import Retry
        from google.cloud.storage.retry import DEFAULT_RETRY

        parsed = urlparse(uri)
        self.bucket_name = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"gs://{self.bucket_name}" + (f"/{self.prefix}" if self.prefix else "")
        if retry_deadline is None:
            retry_deadline = float(os.environ.get("COVID_STORE_RETRY_DEADLINE", "120"))
        self.retry_deadline = retry_deadline
        self._retry: Retry = DEFAULT_RETRY.with_timeout(retry_deadline)
        self._client = client or _gcs_client()
        self._bucket = self._client.bucket(self.bucket_name)
        self.endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"

    def child(self, prefix: str) -> GCSStore:
        return GCSStore(self.uri_for(prefix))

    def _name(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        from google.api_core import exceptions as gexc
        from requests import exceptions as rexc

        try:
            return fn(*args, retry=self._retry, timeout=min(60.0, self.retry_deadline), **kwargs)
        except gexc.NotFound as e:
            if "bucket" in str(e).lower() and not self._bucket_exists():
                raise StoreUnavailableError(
                    f"GCS bucket {self.bucket_name!r} does not exist (at {self.endpoint})"
                ) from None
            raise
        except (gexc.RetryError, rexc.ConnectionError, rexc.Timeout, gexc.ServiceUnavailable) as e:
            raise StoreUnavailableError(
                f"GCS bucket {self.bucket_name!r} at {self.endpoint} is unreachable: {what} failed "
                f"after retrying for {self.retry_deadline:.0f}s ({type(e).__name__}: {_short(e)})"
            ) from e
        except gexc.Forbidden as e:
            raise StoreUnavailableError(
                f"access to GCS bucket {self.bucket_name!r} was refused while trying to {what}: {_short(e)}"
            ) from e

    def _bucket_exists(self) -> bool:
        try:
            return self._client.lookup_bucket(self.bucket_name, retry=self._retry) is not None
        except Exception:
            return True

    def exists(self, key: str) -> bool:
        return self.checksum(key) is not None

    def checksum(self, key: str) -> str | None:
        blob = self._call(f"stat {key}", self._bucket.get_blob, self._name(key))
        return _hex_md5(blob.md5_hash) if blob is not None else None

    def read_bytes(self, key: str) -> bytes:
        from google.api_core import exceptions as gexc

        try:
            return self._call(f"read {key}", self._bucket.blob(self._name(key)).download_as_bytes)
        except gexc.NotFound:
            raise FileNotFoundError(f"no object {self.uri_for(key)}") from None

    def _write_file(self, key: str, path: Path, *, create_only: bool) -> bool:
        from google.api_core import exceptions as gexc

        blob = self._bucket.blob(self._name(key))
        extra = {"if_generation_match": 0} if create_only else {}
        try:
            # A GCS object only becomes visible once its upload is finalised: atomic by design.
            self._call(f"write {key}", blob.upload_from_filename, str(path), **extra)
        except gexc.PreconditionFailed:
            return False
        return True

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        blob = self._call(f"stat {key}", self._bucket.get_blob, self._name(key))
        if blob is None:
            return None, None
        from google.api_core import exceptions as gexc

        generation = blob.generation  # before the download, which may reset it from response headers
        try:
            data = self._call(f"read {key}", blob.download_as_bytes, if_generation_match=generation)
        except (gexc.PreconditionFailed, gexc.NotFound):
            return self.read_versioned(key)  # replaced between stat and read: read the new one
        return data, str(generation)

    def _swap(self, key: str, data: bytes, expected: str | None) -> bool:
        from google.api_core import exceptions as gexc

        blob = self._bucket.blob(self._name(key))
        try:
            self._call(
                f"write {key}",
                blob.upload_from_string,
                data,
                if_generation_match=int(expected) if expected is not None else 0,
            )
        except gexc.PreconditionFailed:
            return False
        return True

    def delete(self, key: str) -> None:
        from google.api_core import exceptions as gexc

        with contextlib.suppress(gexc.NotFound):
            self._call(f"delete {key}", self._bucket.blob(self._name(key)).delete)

    def get_file(self, key: str, dest: Path) -> Path:
        from google.api_core import exceptions as gexc

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            self._call(f"read {key}", self._bucket.blob(self._name(key)).download_to_filename, tmp)
            os.replace(tmp, dest)
        except gexc.NotFound:
            raise FileNotFoundError(f"no object {self.uri_for(key)}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def _blobs(self, prefix: str):
        full = self._name(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        return self._call(
            f"list {prefix or '/'}", lambda **kw: list(self._client.list_blobs(self.bucket_name, prefix=full, **kw))
        )

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._key(b.name) for b in self._blobs(prefix))

    def checksums(self, prefix: str = "") -> dict[str, str]:
        return {self._key(b.name): _hex_md5(b.md5_hash) for b in self._blobs(prefix)}


def _hex_md5(b64: str | None) -> str | None:
    return base64.b64decode(b64).hex() if b64 else None


def _short(e: BaseException, limit: int = 300) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + "..."


def _gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"), credentials=AnonymousCredentials()
        )
    return storage.Client()

"""Stores and objects by URI: ``/path``, ``file:///path`` or ``gs://bucket/prefix``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from covid_data.store.gcs import GCSStore
from covid_data.store.interface import Store
from covid_data.store.local import LocalStore


def open_store(uri: str | Path) -> Store:
    """Open a store from a URI: ``/path``, ``file:///path`` or ``gs://bucket/prefix``."""
    uri = str(uri)
    if uri.startswith("gs://"):
        if not urlparse(uri).netloc:
            raise ValueError(f"store URI {uri!r} names no bucket")
        return GCSStore(uri)
    if uri.startswith("file://"):
        return LocalStore(urlparse(uri).path)
    if "://" in uri:
        raise ValueError(f"unsupported store URI {uri!r}: use a path, file://... or gs://bucket/prefix")
    return LocalStore(uri)


def as_store(store: Store | str | Path) -> Store:
    """``store`` itself when it is open already, else the store at that URI: functions take either,
    so a task opens its store once and passes the object down."""
    return store if isinstance(store, Store) else open_store(store)


def split_object_uri(uri: str) -> tuple[Store, str]:
    """``gs://b/p/x.json`` -> (store at gs://b/p, "x.json")."""
    uri = str(uri).rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name or not parent:
        raise ValueError(f"{uri!r} is not an object URI")
    return open_store(parent), name


def read_object(uri: str) -> bytes:
    store, key = split_object_uri(uri)
    return store.read_bytes(key)

"""Start gcp-storage-emulator with GCS' generation preconditions enforced on uploads.

The emulator accepts ``ifGenerationMatch`` and ignores it, so create-only writes and the
champion's compare-and-swap would pass there without being tested. Real GCS answers a failed
precondition with HTTP 412; this launcher adds exactly that check (under one lock, so two
uploads cannot both pass it) to the emulator's upload handler and runs the emulator unchanged
otherwise. Usage: ``python tests/gcs_emulator.py start --host ... --port ... [emulator flags]``.
"""

from __future__ import annotations

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_lock = threading.Lock()
_insert = objects.insert


def _object_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta", data)
        return meta.get("name") if isinstance(meta, dict) else None
    return None


def insert_with_preconditions(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    if not wanted:
        return _insert(request, response, storage, *args, **kwargs)
    with _lock:
        name = _object_name(request)
        try:
            current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except NotFound:
            current = "0"
        if current != wanted[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            message = "At least one of the pre-conditions you specified did not hold."
            response.json({"error": {"code": 412, "message": message}})
            return None
        return _insert(request, response, storage, *args, **kwargs)


objects.insert = insert_with_preconditions  # before the server module captures its handler table

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    sys.exit(main())

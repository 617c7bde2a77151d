"""Reading an object of a JetStream object store by direct gets, as a reader may: nats-py's
``ObjectStore.get`` reads the chunks through an ordered consumer, which a submitter may not
create (:mod:`jetflow.core.roles`). The object store's layout: the object's metadata on
``$O.<bucket>.M.<base64url name>`` (its ``nuid``, ``size``, ``digest``), its chunks on
``$O.<bucket>.C.<nuid>``, in the stream ``OBJ_<bucket>``."""

from __future__ import annotations

import base64
import hashlib

import nats.js.errors
import orjson
from nats.js import JetStreamContext

from jetflow.adapters.bus import BusError, messages_on

__all__ = ["read_object"]

DIGEST_PREFIX = "SHA-256="


async def read_object(js: JetStreamContext, bucket: str, name: str) -> bytes | None:
    """The object ``name`` of ``bucket`` (None if there is none, or it was deleted); a
    :class:`BusError` when its chunks do not add up to its digest."""
    stream = f"OBJ_{bucket}"
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return None  # no bucket: nothing was ever stored in it
    meta = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    found = await messages_on(js, [meta], stream=stream)
    if not found:
        return None
    try:
        info = orjson.loads(found[-1].data)
    except orjson.JSONDecodeError:
        raise BusError(f"object {name!r} of {bucket}: unreadable metadata") from None
    nuid = info.get("nuid")
    if info.get("deleted") or not nuid:
        return None
    chunks = await messages_on(js, [f"$O.{bucket}.C.{nuid}"], stream=stream)
    data = b"".join(m.data for m in chunks)
    digest = str(info.get("digest") or "")
    if len(data) != int(info.get("size") or 0) or (digest.upper().startswith(DIGEST_PREFIX)
            and base64.urlsafe_b64decode(digest[len(DIGEST_PREFIX):])
            != hashlib.sha256(data).digest()):
        raise BusError(f"object {name!r} of {bucket}: its chunks do not match its digest")
    return data

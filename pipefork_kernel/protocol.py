"""Length-prefixed JSON frames: the only thing that crosses a pipe.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON holding one object with a ``type``.  JSON (never pickle) because root
reads what children write: a frame can at worst be rejected, never execute.
Sizes are checked before anything is allocated, and every frame a child sends
is validated against the schema below before the parent acts on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from typing import Any

from .errors import ProtocolError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

#: Output frames carry nbformat v4 outputs; ``result`` and ``done`` end a run.
OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "update_display_data", "clear_output", "execute_result", "error"}
)
CHILD_FRAME_TYPES = OUTPUT_TYPES | {"result", "done"}


def encode(message: dict[str, Any], max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Serialize one frame; refuse values JSON cannot carry faithfully."""
    body = json.dumps(message, allow_nan=False, separators=(",", ":")).encode()
    if len(body) > max_bytes:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """Parse a frame body into a dict with a string ``type``."""
    try:
        message = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("frame is not a JSON object with a string 'type'")
    return message


def check_length(length: int, max_bytes: int) -> None:
    if length > max_bytes:
        raise ProtocolError(
            f"frame announces {length} bytes, over the limit of {max_bytes} bytes "
            "(raise max_frame_bytes if such outputs are expected)"
        )


def write_frame(fd: int, message: dict[str, Any], max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
    """Write one frame to a blocking file descriptor."""
    data = memoryview(encode(message, max_bytes))
    while data:
        written = os.write(fd, data)
        data = data[written:]


def read_exact(fd: int, size: int) -> bytes:
    """Read exactly ``size`` bytes from a blocking fd; EOF midway is an error."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed in the middle of a frame")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """Read one frame from a blocking fd; ``None`` on a clean EOF."""
    first = os.read(fd, HEADER.size)
    if not first:
        return None
    header = first + read_exact(fd, HEADER.size - len(first)) if len(first) < HEADER.size else first
    (length,) = HEADER.unpack(header)
    check_length(length, max_bytes)
    return decode(read_exact(fd, length))


async def aread_frame(
    reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> dict[str, Any] | None:
    """Read one frame from a stream; ``None`` on a clean EOF."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed in the middle of a frame header") from None
    (length,) = HEADER.unpack(header)
    check_length(length, max_bytes)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed in the middle of a frame") from None
    return decode(body)


# --- schema of what a child may send -------------------------------------------------


def _require(message: dict[str, Any], key: str, kinds: type | tuple[type, ...]) -> Any:
    value = message.get(key)
    if not isinstance(value, kinds):
        raise ProtocolError(f"{message['type']!r} frame needs {key!r} of type {kinds}")
    return value


def _check_mimebundle(message: dict[str, Any]) -> None:
    data = _require(message, "data", dict)
    for mime, value in data.items():
        if "/" not in mime:
            raise ProtocolError(f"display frame has an invalid mime type {mime!r}")
        if not isinstance(value, (str, dict, list)):
            raise ProtocolError(f"display frame value for {mime!r} must be a string or JSON")
    _require(message, "metadata", dict)


def validate_child_frame(message: dict[str, Any]) -> dict[str, Any]:
    """Check a frame from a child against the schema; return it unchanged.

    Unknown keys are dropped so nothing unexpected is relayed onwards.
    """
    kind = message["type"]
    if kind not in CHILD_FRAME_TYPES:
        raise ProtocolError(f"unknown frame type {kind!r}")
    if kind == "stream":
        if message.get("name") not in ("stdout", "stderr"):
            raise ProtocolError("stream frame needs name 'stdout' or 'stderr'")
        _require(message, "text", str)
        return {"type": kind, "name": message["name"], "text": message["text"]}
    if kind in ("display_data", "update_display_data", "execute_result"):
        _check_mimebundle(message)
        clean = {"type": kind, "data": message["data"], "metadata": message["metadata"]}
        transient = message.get("transient", {})
        if not isinstance(transient, dict):
            raise ProtocolError("'transient' must be an object")
        if kind == "update_display_data" and not isinstance(transient.get("display_id"), str):
            raise ProtocolError("update_display_data needs transient.display_id")
        if transient:
            clean["transient"] = transient
        if kind == "execute_result":
            count = message.get("execution_count")
            if count is not None and not isinstance(count, int):
                raise ProtocolError("execution_count must be an integer or null")
            clean["execution_count"] = count
        return clean
    if kind == "clear_output":
        return {"type": kind, "wait": bool(_require(message, "wait", bool))}
    if kind == "error":
        trace = _require(message, "traceback", list)
        if not all(isinstance(line, str) for line in trace):
            raise ProtocolError("error traceback must be a list of strings")
        return {
            "type": kind,
            "ename": _require(message, "ename", str),
            "evalue": _require(message, "evalue", str),
            "traceback": trace,
        }
    if kind == "result":
        if "value" not in message:
            raise ProtocolError("result frame needs 'value'")
        return {"type": kind, "value": message["value"]}
    # done
    if message.get("status") not in ("ok", "error"):
        raise ProtocolError("done frame needs status 'ok' or 'error'")
    return {"type": kind, "status": message["status"]}


def to_nbformat(frame: dict[str, Any]) -> dict[str, Any]:
    """Turn a validated output frame into an nbformat output.

    ``transient`` (the display id) is kept for whoever relays it live; the
    notebook's stored form drops it (see OutputCollector).
    """
    output = {k: v for k, v in frame.items() if k != "type"}
    output["output_type"] = frame["type"]
    return output

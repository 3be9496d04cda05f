"""Child side: turn everything a run prints or displays into frames.

Python-level writes (``print``, ``display()``, the last expression, tracebacks)
become frames synchronously, in order.  Writes to file descriptors 1 and 2
(subprocesses, C extensions) are read by one thread per descriptor.  Stream
text is buffered briefly so a 100 MB print is not a million frames, and is
always flushed before any other frame so order is kept.
"""

from __future__ import annotations

import base64
import codecs
import io
import json
import os
import selectors
import threading
import time
from typing import Any

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from . import protocol

FLUSH_INTERVAL = 0.05
FLUSH_BYTES = 64 * 1024


class FrameSink:
    """Serializes frames onto the pipe and enforces the output budget.

    The parent enforces the same budget again: this copy only saves bandwidth,
    since user code can always write to the pipe directly.
    """

    def __init__(self, fd: int, max_output_bytes: int, max_frame_bytes: int):
        self.fd = fd
        self.max_output_bytes = max_output_bytes
        self.max_frame_bytes = max_frame_bytes
        self.sent_output_bytes = 0
        self.capped = False
        self.lock = threading.RLock()
        self.streams: dict[str, StreamCapture] = {}

    def flush_streams(self) -> None:
        for stream in self.streams.values():
            stream.flush()

    def send(self, message: dict[str, Any]) -> None:
        """Send a control frame (result, done); never dropped."""
        with self.lock:
            self.flush_streams()
            protocol.write_frame(self.fd, message, self.max_frame_bytes)

    def send_output(self, message: dict[str, Any], size: int | None = None) -> None:
        """Send an output frame unless the run's output budget is spent."""
        with self.lock:
            if message["type"] != "stream":
                self.flush_streams()
            if size is None:
                size = len(json.dumps(message))
            over = self.capped or self.sent_output_bytes + size > self.max_output_bytes
            if over and message["type"] != "error":
                if not self.capped:
                    self.capped = True
                    notice = (
                        f"\n[pipefork: output limit of {self.max_output_bytes} bytes reached; "
                        "further output of this run is dropped]\n"
                    )
                    protocol.write_frame(self.fd, {"type": "stream", "name": "stderr", "text": notice})
                return
            self.sent_output_bytes += size
            protocol.write_frame(self.fd, message, self.max_frame_bytes)


def jsonable_bundle(data: dict[str, Any]) -> dict[str, Any]:
    """Binary reprs (``_repr_png_`` returns bytes) travel base64-encoded, as in Jupyter."""
    return {
        mime: base64.b64encode(value).decode() if isinstance(value, bytes) else value
        for mime, value in data.items()
    }


class StreamCapture(io.TextIOBase):
    """A text stream whose writes become ``stream`` frames."""

    def __init__(self, sink: FrameSink, name: str):
        super().__init__()
        self.sink = sink
        self.name = name
        self.buffer_parts: list[str] = []
        self.buffered = 0
        self.last_flush = 0.0
        self.lock = threading.Lock()
        sink.streams[name] = self

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self.lock:
            self.buffer_parts.append(text)
            self.buffered += len(text)
            # A line ending after a quiet spell goes out at once (a print just
            # before a crash is not lost); bursts are batched by the OutputPump.
            quiet = time.monotonic() - self.last_flush > FLUSH_INTERVAL
            due = self.buffered >= FLUSH_BYTES or (quiet and "\n" in text)
        if due:
            self.flush()
        return len(text)

    def flush(self) -> None:
        with self.sink.lock:
            with self.lock:
                text = "".join(self.buffer_parts)
                self.buffer_parts.clear()
                self.buffered = 0
                if text:
                    self.last_flush = time.monotonic()
            if text:
                message = {"type": "stream", "name": self.name, "text": text}
                self.sink.send_output(message, size=len(text))


class OutputPump(threading.Thread):
    """The child's one helper thread: relays fds 1 and 2, and flushes buffered text.

    Writes to the raw descriptors (subprocesses, C code) become stream text;
    every FLUSH_INTERVAL, text buffered by print() is sent, so output is live.
    """

    def __init__(self, sink: FrameSink, sources: dict[int, StreamCapture]):
        super().__init__(name="pipefork-output", daemon=True)
        self.sink = sink
        self.sources = sources
        self.stopping = threading.Event()

    def run(self) -> None:
        decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in self.sources}
        with selectors.DefaultSelector() as selector:
            for fd in self.sources:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                ready = selector.select(FLUSH_INTERVAL)
                for key, _ in ready:
                    try:
                        data = os.read(key.fd, 65536)
                    except OSError:
                        data = b""
                    stream = self.sources[key.fd]
                    if data:
                        stream.write(decoders[key.fd].decode(data))
                    else:
                        stream.write(decoders[key.fd].decode(b"", final=True))
                        selector.unregister(key.fd)
                try:
                    self.sink.flush_streams()
                except OSError:
                    return
                if self.stopping.is_set() and not ready:
                    return  # a grandchild still holds the pipe: stop waiting for it


class CaptureDisplayPublisher(DisplayPublisher):
    """``display()`` and friends → display_data / update_display_data frames."""

    sink: FrameSink | None = None

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        if self.sink is None:
            return
        message = {
            "type": "update_display_data" if update else "display_data",
            "data": jsonable_bundle(data),
            "metadata": metadata or {},
        }
        if transient:
            message["transient"] = transient
        self.sink.send_output(message)

    def clear_output(self, wait=False):
        if self.sink is not None:
            self.sink.send_output({"type": "clear_output", "wait": bool(wait)}, size=0)


class CaptureDisplayHook(DisplayHook):
    """The last expression's value → an execute_result frame."""

    sink: FrameSink | None = None

    def start_displayhook(self):
        self.pending: dict[str, Any] = {}

    def write_output_prompt(self):
        pass

    def write_format_data(self, format_dict, md_dict=None):
        self.pending = {"data": jsonable_bundle(format_dict), "metadata": md_dict or {}}

    def finish_displayhook(self):
        if self.sink is not None and getattr(self, "pending", None):
            self.sink.send_output(
                {"type": "execute_result", "execution_count": self.prompt_count, **self.pending}
            )
        self.pending = {}


class CaptureShell(InteractiveShell):
    """An IPython shell whose outputs and tracebacks become frames."""

    display_pub_class = CaptureDisplayPublisher
    displayhook_class = CaptureDisplayHook

    sink: FrameSink | None = None
    run_as_user = ""

    def attach(self, sink: FrameSink, user: str) -> None:
        self.sink = sink
        self.display_pub.sink = sink
        self.displayhook.sink = sink
        self.run_as_user = user

    def _showtraceback(self, etype, evalue, stb):
        if self.sink is None:
            return
        self.sink.send_output(
            {
                "type": "error",
                "ename": getattr(etype, "__name__", str(etype)),
                "evalue": str(evalue),
                "traceback": [*stb, f"(this cell ran as user {self.run_as_user!r})"],
            }
        )

"""Every run and every refusal is recorded: jupyter_events, and optionally JSON lines."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from jupyter_events import EventLogger

SCHEMA_PATH = Path(__file__).parent / "event_schemas" / "run.yaml"
SCHEMA_ID = "https://events.pipefork.dev/jupyter_server_ext/run/v1"


class AuditLog:
    """Emits one event per record on the server's event logger, and to a file if asked."""

    def __init__(self, event_logger: EventLogger, path: str = ""):
        self.event_logger = event_logger
        self.path = path
        self.lock = threading.Lock()
        event_logger.register_event_schema(SCHEMA_PATH)

    def record(self, **data: Any) -> None:
        record = {k: v for k, v in data.items() if v is not None or k in ("user", "path")}
        self.event_logger.emit(schema_id=SCHEMA_ID, data=record)
        if self.path:
            line = json.dumps(record, sort_keys=True) + "\n"
            with self.lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(line)

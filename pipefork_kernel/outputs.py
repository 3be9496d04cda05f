"""Outputs of a run: collected into notebook form, and relayed into the caller."""

from __future__ import annotations

import sys
from typing import Any


class OutputCollector:
    """Builds the list of outputs a notebook would store from streamed frames.

    Consecutive stream text of the same name is merged, ``update_display_data``
    rewrites the display with the same id, and ``clear_output`` empties the list
    (at the next output when ``wait`` is true), exactly as a notebook does.
    Stream pieces are joined once, when the list is read: appending to one
    growing string would make a long stream quadratic.
    """

    def __init__(self) -> None:
        self._outputs: list[dict[str, Any]] = []
        self._stream_parts: list[str] = []
        self.display_ids: dict[str, list[int]] = {}
        self.clear_pending = False

    @property
    def outputs(self) -> list[dict[str, Any]]:
        self._seal_stream()
        return self._outputs

    def add(self, output: dict[str, Any]) -> None:
        kind = output["output_type"]
        if kind == "clear_output":
            if output.get("wait"):
                self.clear_pending = True
            else:
                self._clear()
            return
        if kind == "update_display_data":
            display_id = output.get("transient", {}).get("display_id")
            for index in self.display_ids.get(display_id, []):
                self._outputs[index]["data"] = output["data"]
                self._outputs[index]["metadata"] = output["metadata"]
            return
        if self.clear_pending:
            self._clear()
        stored = {k: v for k, v in output.items() if k != "transient"}
        last = self._outputs[-1] if self._outputs else None
        if kind == "stream" and self._stream_parts and last and last["name"] == stored["name"]:
            self._stream_parts.append(stored["text"])
            return
        self._seal_stream()
        display_id = output.get("transient", {}).get("display_id")
        if display_id:
            self.display_ids.setdefault(display_id, []).append(len(self._outputs))
        self._outputs.append(stored)
        if kind == "stream":
            self._stream_parts = [stored["text"]]

    def _seal_stream(self) -> None:
        if self._stream_parts:
            self._outputs[-1]["text"] = "".join(self._stream_parts)
            self._stream_parts = []

    def _clear(self) -> None:
        self._outputs.clear()
        self._stream_parts = []
        self.display_ids.clear()
        self.clear_pending = False


def in_ipython() -> bool:
    shell_module = sys.modules.get("IPython")
    return bool(shell_module) and shell_module.get_ipython() is not None


def relay_output(output: dict[str, Any]) -> None:
    """Re-emit one output in the caller: IPython's display machinery, or print."""
    kind = output["output_type"]
    if kind == "stream":
        stream = sys.stderr if output["name"] == "stderr" else sys.stdout
        stream.write(output["text"])
        stream.flush()
        return
    if kind == "error":
        return  # the caller raises (run_as) or returns it (run_cell_as)
    if in_ipython():
        from IPython.display import clear_output, publish_display_data

        if kind == "clear_output":
            clear_output(wait=output["wait"])
        else:
            publish_display_data(
                output["data"],
                output["metadata"],
                transient=output.get("transient"),
                update=kind == "update_display_data",
            )
    elif kind in ("display_data", "execute_result"):
        print(output["data"].get("text/plain", f"<{', '.join(output['data'])}>"))

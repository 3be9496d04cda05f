"""Output from another user's code is untrusted for the person looking at it.

JupyterLab renders outputs produced in a session as trusted: a student's
``display(HTML("<script>..."))`` would run in the admin's browser, with the
admin's token.  So by default only passive mime types are relayed, HTML is
cleaned with nh3 (a maintained sanitizer, not regexes), and raw HTML inside
Markdown is escaped.  ``trust=True`` relays everything as it came.
"""

from __future__ import annotations

from typing import Any

import nh3

#: Relayed unchanged: they cannot carry active content.
PASSIVE_MIME_TYPES = frozenset({"text/plain", "image/png", "image/jpeg", "image/gif", "application/json"})
SANITIZED_MIME_TYPES = frozenset({"text/html", "text/markdown"})


def sanitize_bundle(data: dict[str, Any]) -> dict[str, Any]:
    """Keep passive types, clean HTML and Markdown, drop the rest (JavaScript, SVG, widgets)."""
    clean: dict[str, Any] = {}
    for mime, value in data.items():
        if mime in PASSIVE_MIME_TYPES:
            clean[mime] = value
        elif mime == "text/html" and isinstance(value, str):
            clean[mime] = nh3.clean(value)
        elif mime == "text/markdown" and isinstance(value, str):
            clean[mime] = value.replace("<", "&lt;")
    if not clean:
        dropped = ", ".join(sorted(data)) or "nothing"
        clean["text/plain"] = (
            f"[pipefork: output of type {dropped} not shown: it could run code in your browser]"
        )
    return clean


def sanitize_output(output: dict[str, Any], trust: bool = False) -> dict[str, Any]:
    """The output as it may be shown to someone other than its author."""
    if trust or "data" not in output:
        return output
    return {**output, "data": sanitize_bundle(output["data"])}

"""Per-run limits: rlimits applied in the child, and the parent's own caps."""

from __future__ import annotations

from typing import Any

from traitlets import Float, Int
from traitlets.config import LoggingConfigurable

GiB = 1024**3
MiB = 1024**2


class RunLimits(LoggingConfigurable):
    """Resource limits for each run. A value of 0 means "no limit" unless noted."""

    default_timeout = Float(
        60.0,
        config=True,
        help="Seconds a run may take when the caller gives no timeout. 0 disables it.",
    )
    kill_grace = Float(
        1.0,
        config=True,
        help="Seconds between SIGTERM and SIGKILL when a run times out or is cancelled.",
    )
    max_output_bytes = Int(
        10 * MiB,
        config=True,
        help="Output bytes relayed per run; later output is dropped with a visible notice.",
    )
    max_frame_bytes = Int(
        16 * MiB,
        config=True,
        help="Largest single frame accepted from a child (one display, result or stream chunk).",
    )
    rlimit_as = Int(
        4 * GiB,
        config=True,
        help="RLIMIT_AS: address space in bytes for the run's processes (memory bombs).",
    )
    rlimit_cpu = Int(
        0,
        config=True,
        help="RLIMIT_CPU: CPU seconds per process. Timeouts already bound wall time.",
    )
    rlimit_nproc = Int(
        512,
        config=True,
        help=(
            "RLIMIT_NPROC: processes the target user may own in total (fork bombs). "
            "Counts every process of that user on the machine, not only this run's."
        ),
    )
    rlimit_fsize = Int(
        4 * GiB,
        config=True,
        help="RLIMIT_FSIZE: largest file in bytes a run may write.",
    )

    def rlimits(self) -> dict[str, int]:
        """The rlimits for the child; core dumps are always off (they leak memory to disk)."""
        return {
            "RLIMIT_AS": self.rlimit_as,
            "RLIMIT_CPU": self.rlimit_cpu,
            "RLIMIT_NPROC": self.rlimit_nproc,
            "RLIMIT_FSIZE": self.rlimit_fsize,
            "RLIMIT_CORE": 0,
        }

    def effective_timeout(self, timeout: float | None) -> float | None:
        value = self.default_timeout if timeout is None else timeout
        return value if value and value > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"rlimits": self.rlimits(), "kill_grace": self.kill_grace}

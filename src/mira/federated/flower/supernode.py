"""``flower-supernode`` with a shorter idle poll (``python -m mira.federated.flower.supernode ARGS``).

Flower 1.42's SuperNode waits a fixed 3 s (``time.sleep(3)`` in
``flwr.supernode.start_client_internal``) before it asks the SuperLink again when there was no
message, and 0.5 s between checks for a finished reply: on average 1.5 s of every message's
latency, up to 3 s, with nothing to configure. This entry point runs Flower's own
``flower_supernode()`` main, unchanged, with those waits capped at ``MIRA_SUPERNODE_POLL``
seconds (``bundle.POLL_ENV``: 0.3, as ``mira flower local`` and ``mira flower supernode`` set
it). Each poll is one small HTTPS request to the SuperLink: 0.3 s is ~3 requests a second
per node, fine for tens of nodes; raise it for a large federation. Unset, or >= 3: Flower's
behaviour exactly. Should a Flower release rename what is patched, the SuperNode runs
unpatched (and says so).
"""
from __future__ import annotations

import os
import sys
import time

POLL = "MIRA_SUPERNODE_POLL"
# Where to write the Flower exit code (``flwr_exit``'s "Exit Code: 305") when the SuperNode gives up:
# the process itself exits with 1 for every such error, so the supervisor reads the code here.
STATUS = "MIRA_SUPERNODE_STATUS"


class _CappedTime:
    """``time`` for ``start_client_internal``: ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self.cap))


def patch_poll(cap: float) -> bool:
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if getattr(sci, "time", None) is not time:
        print(f"[mira supernode] flwr.supernode.start_client_internal has no `time` to patch; idle poll left "
              "at Flower's 3 s", file=sys.stderr, flush=True)
        return False
    sci.time = _CappedTime(cap)
    return True


def watch_exit_codes(path: str) -> None:
    """Write the code of Flower's "Exit Code: N" error log line to ``path``."""
    import logging
    import re

    class Catch(logging.Handler):
        def emit(self, record):
            m = re.match(r"Exit Code: (\d+)", str(record.getMessage()))
            if m:
                try:
                    with open(path, "w") as f:
                        f.write(m.group(1))
                except OSError:
                    pass

    logging.getLogger("flwr").addHandler(Catch(logging.ERROR))


def debug_log(path: str) -> None:
    """Append Flower's INFO lines with a timestamp to ``path`` (``MIRA_FORKSERVER_DEBUG``: the
    SuperNode's side of a message's phases, next to the fork server's)."""
    import logging

    class Stamp(logging.Handler):
        def emit(self, record):
            text = str(record.getMessage()).strip()
            if not text:
                return
            try:
                with open(path, "a") as f:
                    f.write(f"{time.time():.3f} {os.getpid()} supernode {text.splitlines()[0][:120]}\n")
            except OSError:
                pass

    logging.getLogger("flwr").addHandler(Stamp(logging.INFO))


def main() -> int:
    if os.environ.get(STATUS):
        watch_exit_codes(os.environ[STATUS])
    if os.environ.get("MIRA_FORKSERVER_DEBUG"):
        debug_log(os.environ["MIRA_FORKSERVER_DEBUG"])
    raw = os.environ.get(POLL, "")
    try:
        cap = float(raw) if raw else None
    except ValueError:
        print(f"[mira supernode] {POLL}={raw!r} is not a number; idle poll left at Flower's 3 s", file=sys.stderr)
        cap = None
    if cap is not None and 0 < cap < 3:
        patch_poll(cap)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())

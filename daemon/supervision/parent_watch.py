"""Exit when supervisord goes away without stopping us (it was SIGKILLed).

Programs started by supervisord call `watch_parent()`; when their parent changes,
they send themselves SIGTERM and shut down as on a normal stop, children included.
"""

from __future__ import annotations

import os
import signal
import threading
import time

INTERVAL = 1.0


def watch_parent(interval: float = INTERVAL) -> threading.Thread | None:
    if os.environ.get("SUPERVISOR_ENABLED") != "1":
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread

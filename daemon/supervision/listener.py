"""Supervisord event listener: when any member of the group dies, bring the group down.

Paste into supervisord.conf::

    [eventlistener:group_down]
    command=python -m mlxgate.supervision.listener
    events=PROCESS_STATE_EXITED,PROCESS_STATE_FATAL

A program exiting on its own (EXITED) or given up on (FATAL) leaves the gateway half
alive; shutting supervisord down instead lets the boot service restart everything
cleanly. Stops asked for (`supervisorctl stop/restart`) are STOPPED events and are
ignored. stdout is the protocol: diagnostics go to stderr only.
"""

from __future__ import annotations

import os
import sys

from supervisor import childutils

WATCHED = frozenset({"proxy", "proxy_https", "wrapper"})


class GroupDownListener:
    def __init__(self, rpc=None, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr,
                 watched=WATCHED):
        self.rpc = rpc
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.watched = watched
        self.shutting_down = False

    def runforever(self) -> None:
        while True:
            self.run_once()

    def run_once(self) -> bool:
        """Wait for one event, acknowledge it, then act. True when it shut the group down."""
        headers, payload = childutils.listener.wait(self.stdin, self.stdout)
        childutils.listener.ok(self.stdout)
        return self.handle(headers["eventname"], payload)

    def handle(self, event: str, payload: str) -> bool:
        fields, _ = childutils.eventdata(payload + "\n")
        name = fields.get("processname", "?")
        if name not in self.watched or self.shutting_down:
            return False
        if event == "PROCESS_STATE_EXITED":
            why = (f"exited on its own (pid {fields.get('pid')}, "
                   f"{'expected' if fields.get('expected') == '1' else 'unexpected'} exit status)")
        elif event == "PROCESS_STATE_FATAL":
            why = "could not be started (FATAL)"
        else:
            return False
        self.log(f"{name} {why}; bringing the whole mlxgate group down. "
                 f"See {name}'s log (`mlxgate logs {name}`).")
        self.shutting_down = True
        self.shutdown()
        return True

    def shutdown(self) -> None:
        try:
            (self.rpc or childutils.getRPCInterface(os.environ)).supervisor.shutdown()
        except Exception as exc:  # supervisord may already be going down
            self.log(f"shutdown request failed ({exc}); sending SIGTERM to supervisord")
            os.kill(os.getppid(), 15)

    def log(self, message: str) -> None:
        self.stderr.write(f"group_down: {message}\n")
        self.stderr.flush()


def main() -> None:
    GroupDownListener().runforever()


if __name__ == "__main__":
    main()

"""What mlxgate sets up on this machine outside its own folders: the boot service
(`service`), 443/80 forwarding on loopback (`forwarding`), the hosts entry for a domain
it stands in for (`hosts`), its certificate authority in the system trust store
(`trust`). Steps that need root are run together, once, by `privileged`; `install`
decides which are wanted and remembers what it did, so running it again updates in place
and `uninstall` removes every trace."""

from __future__ import annotations

import subprocess
from typing import Sequence

from ..errors import MlxgateError


def run(argv: Sequence[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a system command, capturing its output; a failure names the command and what it said."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    except FileNotFoundError:
        raise MlxgateError(f"`{argv[0]}` is not installed on this machine") from None
    if check and result.returncode != 0:
        said = (result.stderr or result.stdout).strip()
        raise MlxgateError(f"`{' '.join(argv)}` failed (exit {result.returncode}): {said}")
    return result

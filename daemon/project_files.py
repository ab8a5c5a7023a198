"""The files at the top of the tree that the package runs with: `supervisord.conf`, the
built-in plugins in `plugins/` and the boot service's templates in `launchd/` and `systemd/`.

They stay where the tree has them. A wheel carries copies in `mlxgate/data/` (setup.py's
build step), so an installed mlxgate (`pip install .`, pipx, `uv tool install`) has them
too; run from a checkout (the editable install of ./install.sh), the checkout's own are used.
"""

from __future__ import annotations

from pathlib import Path

from . import PROJECT_ROOT
from .errors import MlxgateError

PACKAGE = Path(__file__).resolve().parent
IN_CHECKOUT = PACKAGE.name == "daemon"  # the package's folder in the tree; installed, it is mlxgate/
INSTALLED_DATA = PACKAGE / "data"       # where setup.py puts the copies in a wheel

FIX = {True: "restore it in the checkout (`git checkout -- {name}`)",
       False: "reinstall mlxgate from a checkout that has it (`pip install /path/to/mlxgate`)"}


def project_file(name: str) -> Path:
    """`name` (a path from the top of the tree) in the checkout when mlxgate runs from one,
    else in the installed package's copies."""
    path = (PROJECT_ROOT if IN_CHECKOUT else INSTALLED_DATA) / name
    if not path.exists():
        raise MlxgateError(f"{path} is missing. Fix: " + FIX[IN_CHECKOUT].format(name=name))
    return path

"""The one PluginManager: built-in plugins, plugin folders and entry points.

Loading order decides call order (pluggy calls the last registered first): built-in
plugins register first, so user plugins run before them and can override them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError
from .project_files import project_file

log = logging.getLogger("mlxgate.plugins")

BUILTIN_PLUGINS = ("normalize", "ensure_loaded", "token_cap", "stable_prefix")


def _load_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        line = frames[-1].lineno if frames else getattr(exc, "lineno", None)
        where = f"{path}:{line}" if line else str(path)
        raise PluginError(f"plugin {where} failed to load: {type(exc).__name__}: {exc}. "
                          f"Fix the file or move it out of {path.parent}.") from None
    sys.modules[module_name] = module
    return module


def plugin_files(dirs: Iterable[Path]) -> list[Path]:
    """User plugin files: every *.py in the folders, built-ins excluded, by name; with
    `MLXGATE_CHECKOUT_DROP_INS=0` none from the built-ins' own folder (the test suite sets it, so
    a plugin a developer dropped into the checkout's `plugins/` cannot change its results)."""
    builtin_dir = project_file("plugins").resolve()
    drop_ins_beside_builtins = os.environ.get("MLXGATE_CHECKOUT_DROP_INS", "1").strip() != "0"
    files = []
    for folder in dirs:
        folder = Path(folder).expanduser()
        beside_builtins = folder.is_dir() and folder.resolve() == builtin_dir
        if beside_builtins and not drop_ins_beside_builtins:
            continue
        for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
            if path.name.startswith("_"):
                continue
            if beside_builtins and path.stem in BUILTIN_PLUGINS:
                continue
            files.append(path)
    return files


def make_manager(plugin_dirs: Iterable[Path] = (), entry_points: bool | None = None,
                 trace: bool = False) -> pluggy.PluginManager:
    """Build the manager: built-ins, then plugins/ and `plugin_dirs`, then entry points."""
    if entry_points is None:
        entry_points = os.environ.get("MLXGATE_LOAD_ENTRY_POINTS", "1").strip() != "0"
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    builtin_dir = project_file("plugins")
    for name in BUILTIN_PLUGINS:
        _register(pm, _load_file(builtin_dir / f"{name}.py", f"mlxgate_plugins.{name}"), builtin_dir / f"{name}.py")
    for path in plugin_files([builtin_dir, *plugin_dirs]):
        _register(pm, _load_file(path, f"mlxgate_user_plugins.{path.stem}"), path)
    if entry_points:
        for entry in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            try:
                plugin = entry.load()
            except Exception as exc:
                raise PluginError(f"plugin entry point {entry.name} ({entry.value}) failed to load: "
                                  f"{type(exc).__name__}: {exc}") from None
            _register(pm, plugin, entry.value)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}. Hook names must be one of: "
                          f"{', '.join(n for n in dir(hookspecs) if n.startswith('mlxgate_'))}.") from None
    if trace:
        pm.trace.root.setwriter(lambda message: log.debug("hook %s", message.rstrip()))
        pm.enable_tracing()
    return pm


def _register(pm: pluggy.PluginManager, plugin, origin) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pm.register(plugin, name=str(origin))
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {origin}: {exc}") from None
        except ValueError:
            pass  # already registered: loading is idempotent
    for warning in caught:  # a hook of the old contract: it still works, and the log says what to change
        log.warning("plugin %s: %s", origin, warning.message)

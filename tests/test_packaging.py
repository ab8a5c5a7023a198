"""`pip install .` (and pipx, `uv tool install`) gives a whole mlxgate: the wheel carries
supervisord.conf, the built-in plugins and the service templates, and the installed package
starts a gateway from them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import psutil
import pytest

from mlxgate.plugins import BUILTIN_PLUGINS
from support import ROOT, Gateway, claude

PIP = [sys.executable, "-m", "pip"]
TOP_LEVEL_DATA = sorted(str(path.relative_to(ROOT)) for pattern in ("supervisord.conf", "plugins/*.py", "launchd/*",
                                                                    "systemd/*") for path in ROOT.glob(pattern))


def run(argv: list, **options) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **options)
    assert result.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """This checkout as a clone of it would be, with the changes not yet committed (and not
    the checkout itself: a build leaves build/ and egg-info behind)."""
    copy = tmp_path_factory.mktemp("tree") / "mlxgate"
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def wheel(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([*PIP, "wheel", "--no-deps", ".", "-w", out], cwd=tree)
    return next(out.glob("mlxgate-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed with `pip install --target`: importable with PYTHONPATH, the
    dependencies coming from this virtualenv."""
    target = tmp_path_factory.mktemp("installed")
    run([*PIP, "install", "--no-deps", "--target", target, wheel])
    return target


def installed_python(target: Path, code: str) -> str:
    """Run `code` with the installed mlxgate (not this checkout's) and return what it printed."""
    return run([sys.executable, "-c", code], cwd=target.parent, env={**os.environ, "PYTHONPATH": str(target)}).stdout


def test_the_wheel_holds_supervisord_conf_and_every_builtin_plugin(wheel):
    with zipfile.ZipFile(wheel) as archive:
        for name in TOP_LEVEL_DATA:
            assert archive.read(f"mlxgate/data/{name}") == (ROOT / name).read_bytes(), name


def test_the_sdist_holds_them_too(tree, tmp_path):
    """`python -m build` and pipx from an sdist build the wheel from it."""
    run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"],
        cwd=tree)
    with tarfile.open(next(tmp_path.glob("mlxgate-*.tar.gz"))) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert set(TOP_LEVEL_DATA) <= names, set(TOP_LEVEL_DATA) - names


def test_the_installed_mlxgate_finds_its_supervisord_template_and_builtin_plugins(installed):
    printed = installed_python(installed, "\n".join([
        "import mlxgate",
        "from mlxgate.plugins import make_manager",
        "from mlxgate.project_files import project_file",
        "print(mlxgate.__file__)",
        f"print(*(project_file(name) for name in {TOP_LEVEL_DATA!r}), sep='\\n')",
        "print(*sorted(name for name, _ in make_manager(entry_points=False).list_name_plugin()), sep='\\n')",
    ])).splitlines()
    data = installed / "mlxgate" / "data"
    assert printed[0] == str(installed / "mlxgate" / "__init__.py")
    assert printed[1:1 + len(TOP_LEVEL_DATA)] == [str(data / name) for name in TOP_LEVEL_DATA]
    assert sorted(printed[1 + len(TOP_LEVEL_DATA):]) == sorted(str(data / "plugins" / f"{name}.py")
                                                               for name in BUILTIN_PLUGINS)


def test_what_needs_the_checkout_says_so(installed):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run([sys.executable, "-m", "mlxgate.cli", "start", "--run-install"], env=env,
                            cwd=installed.parent, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "mlxgate start: error: --run-install runs the checkout's ./install.sh" in result.stderr
    old = subprocess.run([sys.executable, "-m", "mlxgate.cli", "start", "--install-dependencies"], env=env,
                         cwd=installed.parent, capture_output=True, text=True, timeout=60)
    assert old.returncode == 1 and "--install-dependencies is now --run-install" in old.stderr, old.stderr


def test_the_installed_mlxgate_fills_its_service_templates(installed):
    printed = installed_python(installed, "\n".join([
        "from mlxgate.system import forwarding",
        "print(forwarding.nft_ruleset(forwarding.forwards(11433)))",
        "print(forwarding.pf_daemon().decode())",
    ]))
    assert "redirect to :11433" in printed and "/etc/pf.anchors/com.mlxgate" in printed


def test_a_gateway_starts_from_the_installed_mlxgate(installed, tmp_path):
    env = {"PYTHONPATH": str(installed)}
    run([sys.executable, "-m", "mlxgate.cli", "demo-model", tmp_path / "models" / "tiny"], cwd=tmp_path,
        env={**os.environ, **env})
    gateway = Gateway(tmp_path / "home", tmp_path / "models", "--default-model", "tiny", https=False, extra_env=env)
    gateway.start()
    try:
        supervisord = psutil.Process(gateway.supervisord_pid())
        assert supervisord.cmdline()[-1] == str(installed / "mlxgate" / "data" / "supervisord.conf")
        wrapper = psutil.Process(gateway.program_pids()["wrapper"])
        assert wrapper.cwd() == str(installed / "mlxgate" / "data")  # the template's directory=%(here)s
        # a claude-* name reaches the default model only through the built-in normalize plugin
        answer = claude(gateway).messages.create(model="claude-opus-4-8", max_tokens=4,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert answer.usage.output_tokens >= 1
    finally:
        gateway.stop()

"""docs/cli.md's reference is what every command's `--help` prints, so the page cannot drift
from the commands."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys

import click

from mlxgate import PROJECT_ROOT
from mlxgate.cli import cli
from mlxgate.cli_reference import MARKER, REGENERATE, with_reference

PAGE = PROJECT_ROOT / "docs" / "cli.md"


def command_paths(command: click.Command, path: str = "mlxgate") -> list[str]:
    paths = [path]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths += command_paths(sub, f"{path} {name}")
    return paths


def reference_tool(*args: str, cwd=PROJECT_ROOT, columns: int = 80) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxgate.cli_reference", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": str(columns)}, timeout=60)


def test_docs_cli_md_has_what_every_command_s_help_prints():
    page = PAGE.read_text()
    wanted = with_reference(page)
    diff = "".join(list(difflib.unified_diff(page.splitlines(True), wanted.splitlines(True), "docs/cli.md",
                                             "the commands' --help"))[:60])
    assert page == wanted, f"docs/cli.md is stale. Run: {REGENERATE}\n{diff}"


def test_every_command_and_subcommand_has_its_section():
    headings = re.findall(r"(?m)^### (mlxgate.*)$", PAGE.read_text().partition(MARKER)[2])
    assert headings == command_paths(cli)
    assert {"mlxgate cache clear", "mlxgate docker up", "mlxgate hosts add", "mlxgate service install"} <= set(headings)


def test_a_stale_page_is_found_and_rewritten_whatever_the_terminal_width(tmp_path):
    stale = tmp_path / "cli.md"
    stale.write_text(PAGE.read_text().replace("start the whole gateway", "start some of the gateway"))
    checked = reference_tool("--check", str(stale), columns=200)
    assert checked.returncode == 1
    assert f"run: python -m mlxgate.cli_reference --write {stale}" in checked.stderr
    assert reference_tool("--write", str(stale), columns=40).returncode == 0
    assert stale.read_text() == PAGE.read_text()
    assert reference_tool("--check", str(stale), columns=300).returncode == 0


def test_a_page_without_the_marker_line_is_refused_with_the_fix(tmp_path):
    page = tmp_path / "cli.md"
    page.write_text("# Commands\n")
    result = reference_tool("--write", str(page))
    assert result.returncode == 1 and page.read_text() == "# Commands\n"
    assert f"{page}: no marker line" in result.stderr and MARKER in result.stderr

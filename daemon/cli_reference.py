"""The command reference of docs/cli.md, written from every command's `--help`.

The page keeps its hand-written part above the marker line; everything below it is this
module's output, so the commands' help texts in `cli.py` are the one source::

    python -m mlxgate.cli_reference --write docs/cli.md   # after changing a command
    python -m mlxgate.cli_reference --check docs/cli.md   # exit 1 when the page is stale

The help is laid out for a fixed width, whatever terminal runs this, so the output is the
same on every machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import click

WIDTH = 100
REGENERATE = "python -m mlxgate.cli_reference --write docs/cli.md"
MARKER = (f"<!-- Generated from each command's --help by `{REGENERATE}`; "
          f"edit the help texts in daemon/cli.py, not the lines below. -->")


def _contexts(ctx: click.Context) -> Iterator[click.Context]:
    """`ctx`, then a context for each subcommand of its command (depth first, by name), as help sees them."""
    yield ctx
    group = ctx.command
    if isinstance(group, click.Group):
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _contexts(click.Context(sub, info_name=name, parent=ctx, **sub.context_settings))


def reference(root: click.Group | None = None) -> str:
    """The generated section: a heading and the `--help` text of every command."""
    if root is None:
        from .cli import cli as root
    top = click.Context(root, info_name="mlxgate", **{**root.context_settings, "terminal_width": WIDTH,
                                                      "max_content_width": WIDTH})
    parts = ["## Reference"]
    for ctx in _contexts(top):
        parts += [f"### {ctx.command_path}", f"```text\n{ctx.command.get_help(ctx)}\n```"]
    return "\n\n".join(parts) + "\n"


def with_reference(page: str, where: str = "docs/cli.md") -> str:
    """`page` with everything below its marker line replaced by the current reference."""
    intro, found, _ = page.partition(MARKER)
    if not found:
        raise ValueError(f"{where}: no marker line to write the reference under. Fix: put this line below the "
                         f"hand-written part:\n{MARKER}")
    return f"{intro}{MARKER}\n\n{reference()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlxgate.cli_reference", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="PAGE", type=Path, help="rewrite PAGE's generated section")
    action.add_argument("--check", metavar="PAGE", type=Path, help="exit 1 when PAGE's generated section is stale")
    args = parser.parse_args(argv)
    page = args.write or args.check
    try:
        current = page.read_text()
        wanted = with_reference(current, str(page))
    except (OSError, ValueError) as exc:
        print(f"cli_reference: error: {exc}", file=sys.stderr)
        return 1
    if args.write:
        page.write_text(wanted)
        return 0
    if current != wanted:
        print(f"{page} is not what the commands' --help says; run: python -m mlxgate.cli_reference --write {page}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

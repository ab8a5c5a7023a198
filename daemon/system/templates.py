"""Fill the templates in launchd/ and systemd/ (the checkout's, or an installed package's copies).

A plist template is itself a valid plist: it is parsed, each string `@NAME@` replaced
(a list item whose value is a list is spliced in, a dict whose only key is a placeholder
becomes the value's dict), and written back with plistlib, so paths never need escaping.
Text templates have `@NAME@` replaced as text."""

from __future__ import annotations

import plistlib
import re

from ..project_files import project_file


def _fill(node, values: dict):
    if isinstance(node, str):
        return values.get(node, node) if re.fullmatch(r"@\w+@", node) else node
    if isinstance(node, list):
        out = []
        for item in node:
            filled = _fill(item, values)
            out.extend(filled if isinstance(item, str) and isinstance(filled, list) else [filled])
        return out
    if isinstance(node, dict):
        if len(node) == 1 and isinstance(values.get(next(iter(node))), dict):
            return dict(values[next(iter(node))])
        return {key: _fill(value, values) for key, value in node.items()}
    return node


def plist(name: str, values: dict) -> bytes:
    """The launchd template `name` (its path from the top of the tree), filled."""
    path = project_file(name)
    template = plistlib.loads(path.read_bytes())
    missing = sorted(set(re.findall(r"@\w+@", path.read_text().split("<plist", 1)[1])) - set(values))
    if missing:
        raise KeyError(f"{name}: no value for {', '.join(missing)}")
    return plistlib.dumps(_fill(template, values))


def text(name: str, values: dict) -> str:
    """A text template (a systemd unit, the nftables rules, the pf anchor), filled; `name` is its
    path from the top of the tree, e.g. systemd/mlxgate.service."""
    path = project_file(name)
    source = path.read_text()
    missing = sorted(set(re.findall(r"@\w+@", source)) - set(values))
    if missing:
        raise KeyError(f"{name}: no value for {', '.join(missing)}")
    return re.sub(r"@\w+@", lambda m: values[m.group(0)], source)

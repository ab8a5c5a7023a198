"""The model servers the config names, declared once.

The resident set holds any number of model servers, one per model, found by the model a
request names. Two of them are the config's own: the default model (``default_model``,
what ``claude-*`` and ``gpt-*`` names get) and the autocomplete model
(``autocomplete_model``, what ``*haiku*`` names and the autocomplete alias get). Each is
loaded at start, pinned (never evicted, never unloaded for idleness) and served on a port
of its own that stays what it always was (``dynamic_port`` 11402, ``autocomplete_port``
11403), so a firewall rule or a script that knows them keeps working. Every other model
gets a port the wrapper chooses when it loads it.

Whatever still says "dynamic" or "autocomplete" (ports, status rows, the start's progress
lines, the port checks) reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Seat:
    name: str       # what status rows and logs call its server ("dynamic": the seed's name for it)
    model_key: str  # the setting that names its model
    port_key: str   # the setting that names its port
    what: str       # what it is for, in messages


SEATS: tuple[Seat, ...] = (
    Seat("dynamic", "default_model", "dynamic_port", "the default model"),
    Seat("autocomplete", "autocomplete_model", "autocomplete_port", "the autocomplete model"),
)


def configured(config: Any) -> list[tuple[Seat, str]]:
    """(seat, model name) of each seat the config gives a model, in order."""
    return [(seat, getattr(config, seat.model_key)) for seat in SEATS if getattr(config, seat.model_key)]


def port_of(config: Any, seat: Seat) -> int:
    return getattr(config, seat.port_key)


def ports(values: Any) -> dict[str, int]:
    """Each seat's port setting and its value (`values`: a Config, or a mapping of settings)."""
    get = values.get if isinstance(values, dict) else lambda key: getattr(values, key)
    return {seat.port_key: get(seat.port_key) for seat in SEATS}

"""Which schemas a chat body asks the answer to be held to, and whether each can be held exactly.

No MLX here: the relay calls `check_request` in the wrapper process to refuse a request before
anything streams, and the model server calls it again (the outcome is cached) on its way to the
grammar (`prepare` gives the schema as the grammar embeds it).

A schema passes when it is a JSON Schema (the metaschema check, with `jsonschema` when it is
installed) and llguidance can compile it; llguidance refuses what it cannot enforce, and the
refusal is turned into the keyword and the place (`UnsupportedSchema.feature`, `.where`).

`format: date`, `date-time` and `time` are held to patterns of our own rather than llguidance's
formats: those let through Feb 29 of every year (RFC 3339 forbids it), year 0000, second 60 and a
lower-case `t`/`z` (RFC 3339 allows these, but Python's `datetime`, Pydantic and `jsonschema`
reject them). The patterns allow only what all of them accept; refusing the formats instead would
refuse every Pydantic model with a date field.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import llguidance

from ..errors import RequestRejected

try:
    import jsonschema
except ImportError:  # the metaschema check is skipped; llguidance still refuses what it cannot compile
    jsonschema = None

# What the grammar lets the model write between JSON tokens: what json.dumps writes, no free
# whitespace (free whitespace lets a weak model loop on blanks until max_tokens).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
RESPONSE_SCHEMA = "response_format.json_schema.schema"


# ---------------------------------------------------------------- errors
class ConstraintError(RequestRejected, ValueError):
    """A request whose structured output cannot be produced: a 400 naming the field (`param`)."""

    code: str | None = None

    def __init__(self, where: str, detail: str):
        super().__init__(400, f"{where}: {detail}")
        self.where = self.param = where
        self.detail = detail


class InvalidSchema(ConstraintError):
    """Not a JSON Schema (or one no value matches)."""

    code = "invalid_schema"


class UnsupportedSchema(ConstraintError):
    """A JSON Schema with a `feature` (a keyword, `format: X`, `$ref: URL`) that cannot be enforced."""

    code = "unsupported_schema_feature"

    def __init__(self, feature: str, where: str, detail: str):
        hint = HINTS.get(re.match(r"[$\w]*", feature).group(), "remove it, and check the answer after it arrives")
        super().__init__(where, f"{feature} cannot be enforced while the model writes ({detail}). Fix: {hint}.")
        self.feature = feature


HINTS = {
    "uniqueItems": "remove it, and drop duplicates from the answer",
    "contains": "remove it, and check the array in the answer",
    "minContains": "remove it, and check the array in the answer",
    "maxContains": "remove it, and check the array in the answer",
    "propertyNames": "name the properties in `properties` (or `patternProperties`) with additionalProperties: false",
    "dependentRequired": "make the fields required, or check the dependency in the answer",
    "dependentSchemas": "make the fields required, or check the dependency in the answer",
    "not": "say what is allowed instead (enum, anyOf)",
    "if": "use anyOf with one branch per case",
    "then": "use anyOf with one branch per case",
    "else": "use anyOf with one branch per case",
    "oneOf": "use anyOf, or give each branch a property with its own const (a discriminator)",
    "format": "use a pattern",
    "$ref": "put the referenced schema under $defs and point to it with #/$defs/NAME",
    "pattern": "write the pattern without look-around and backreferences",
    "unevaluatedProperties": "use additionalProperties",
    "unevaluatedItems": "use items",
    "$dynamicRef": "use $ref",
}


# ---------------------------------------------------------------- what a body asks for
@dataclass(frozen=True)
class Tool:
    name: str
    parameters: Any  # the schema its arguments are held to; None: any JSON object (a tool that is not strict)
    where: str       # "tools[2].function.parameters"


@dataclass(frozen=True)
class Requested:
    """What a chat body asks the answer to be held to.

    `answer`: "json_schema" (held to `schema`), "json_object" or None (free text).
    `calls`: "required" (the answer is tool calls only), "auto" (tool calls or the answer: with no
    `answer`, free text whose tool calls are held), or None (tool calls are not held).
    """

    answer: str | None = None
    schema: Any = None
    calls: str | None = None
    tools: tuple[Tool, ...] = ()
    parallel: bool = True

    def schemas(self) -> Iterator[tuple[Any, str]]:
        """(schema, where) of every schema the answer is held to."""
        if self.answer == "json_schema":
            yield self.schema, RESPONSE_SCHEMA
        for tool in self.tools:
            if tool.parameters is not None:
                yield tool.parameters, tool.where


def requested(body: dict) -> Requested | None:
    """What `body` (an OpenAI chat body) asks for, None when nothing is held.

    response_format {type: json_schema, json_schema: {schema, ...}} or {type: json_object};
    tools with function.strict true are held to their parameters; tool_choice "required" or
    {"type": "function", "function": {"name": N}} makes the answer tool calls only, "auto" (the
    default) holds calls when a tool is strict or when response_format asks for JSON. The
    `strict` of response_format is not read: the answer is always held to the schema.
    Raises ConstraintError for malformed fields."""
    answer, schema = _answer(body.get("response_format"))
    tools = body.get("tools") or []
    choice = body.get("tool_choice", "auto")
    if not isinstance(tools, list) or not tools or choice == "none":
        return Requested(answer, schema) if answer else None
    offered = tuple(_tool(i, tool) for i, tool in enumerate(tools))
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        offered = tuple(tool for tool in offered if tool.name == wanted)
        if not offered:
            raise ConstraintError("tool_choice", f"names {json.dumps(wanted)}, which is not a function in `tools`")
        calls = "required"
    elif choice == "required":
        calls = "required"
    elif choice == "auto":
        calls = "auto" if answer or any(tool.parameters is not None for tool in offered) else None
    else:
        raise ConstraintError("tool_choice", f"expected \"none\", \"auto\", \"required\" or "
                                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
                                             f"{json.dumps(choice)[:80]}")
    if calls is None and answer is None:
        return None
    return Requested(answer, schema, calls, offered if calls else (), body.get("parallel_tool_calls") is not False)


def _answer(response_format) -> tuple[str | None, Any]:
    if response_format is None:
        return None, None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        given = response_format.get("json_schema")
        if not isinstance(given, dict) or "schema" not in given:
            raise InvalidSchema(RESPONSE_SCHEMA, "Field required (the JSON Schema the answer follows)")
        return "json_schema", given["schema"]
    raise ConstraintError("response_format.type", f"expected \"text\", \"json_object\" or \"json_schema\", got "
                                                  f"{json.dumps(kind)}")


def _tool(index: int, tool) -> Tool:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ConstraintError(f"tools[{index}].function.name", "Field required (a string)")
    strict = function.get("strict") is True
    parameters = function.get("parameters", {"type": "object"}) if strict else None
    return Tool(function["name"], parameters, f"tools[{index}].function.parameters")


def check_request(body: dict) -> None:
    """Raise ConstraintError unless every schema `body` holds the answer to can be held."""
    wanted = requested(body)
    if wanted is not None:
        for schema, where in wanted.schemas():
            check(schema, where)


def check(schema: Any, where: str) -> None:
    """Raise InvalidSchema / UnsupportedSchema unless `schema` can be held exactly."""
    prepare(schema, where)


# ---------------------------------------------------------------- one schema
def prepare(schema: Any, where: str) -> str:
    """The JSON text of `schema` as the grammar holds it (dates as patterns, the JSON layout set),
    ready for llguidance's `%json`; raises InvalidSchema / UnsupportedSchema. ~15 ms the first
    time (most of it the metaschema check), microseconds for a schema seen before."""
    try:
        # not sort_keys: llguidance writes properties in the schema's order
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidSchema(where, f"not JSON: {e}") from None
    outcome = _prepared(text)
    if outcome[0] == "ok":
        return outcome[1]
    kind, at, detail, feature = outcome
    if kind == "invalid":
        raise InvalidSchema(where + at, detail)
    raise UnsupportedSchema(feature, where + at, detail)


@functools.lru_cache(maxsize=512)
def _prepared(text: str) -> tuple:
    """("ok", JSON text) or (kind, path inside the schema, detail, feature), for a schema's JSON text."""
    schema = json.loads(text)
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        detail = "`false` matches no value" if schema is False else \
            f"a JSON Schema is an object or a boolean, not {type(schema).__name__}"
        return "invalid", "", detail, None
    if jsonschema is not None:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            return "invalid", _path(e.absolute_path), f"not a valid JSON Schema: {e.message}", None
    held = _dates_as_patterns(schema)
    held["x-guidance"] = JSON_LAYOUT
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(held)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError, RuntimeError) as e:
        return "invalid", "", f"not a JSON Schema llguidance can read: {e}", None
    if failed:
        return _refusal(schema, messages[0])
    return "ok", json.dumps(held, ensure_ascii=False)


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
_EXTERNAL_REF = re.compile(r"Resource '([^']+)' is not present")
_MISSING_POINTER = re.compile(r"Pointer '([^']*)' does not exist")
_REGEX = re.compile(r"regex parse error:\s*\n\s*(.*)\n(?:.*\n)*?error: (.*)")


def _refusal(schema: dict, message: str) -> tuple:
    """llguidance's refusal as (kind, path inside the schema, detail, feature)."""
    detail = " ".join(message.split())[:300]
    if m := _UNIMPLEMENTED.search(message):
        keys = json.loads(f"[{m.group(1)}]")
        at = _where(schema, lambda node: any(key in node for key in keys))
        present = [key for key in _node(schema, at) if key in keys] or keys  # in the schema's order
        return "unsupported", at, detail, ", ".join(present)
    if m := _UNKNOWN_FORMAT.search(message):
        return "unsupported", _where(schema, lambda node: node.get("format") == m.group(1)), detail, \
            f"format: {m.group(1)}"
    if "oneOf constraints are not supported" in message:  # oneOf whose branches llguidance cannot prove disjoint
        return "unsupported", _where(schema, lambda node: "oneOf" in node), detail, "oneOf"
    if m := _EXTERNAL_REF.search(message):
        return "unsupported", _where(schema, lambda node: node.get("$ref") == m.group(1)), detail, \
            f"$ref: {m.group(1)}"
    if m := _MISSING_POINTER.search(message):
        return "invalid", _where(schema, lambda node: node.get("$ref") == "#" + m.group(1)), \
            f"$ref points to #{m.group(1)}, which the schema does not have", None
    if m := _REGEX.search(message):
        pattern, problem = m.group(1).strip(), m.group(2).strip()
        at = _where(schema, lambda node: node.get("pattern") == pattern or pattern in (node.get("patternProperties")
                                                                                        or {}))
        return "unsupported", at, detail, f"pattern ({problem.split(',')[0]})"
    if "Unsatisfiable" in message:
        return "invalid", "", f"no value can match it ({detail})", None
    return "unsupported", "", detail, message.splitlines()[0][:120]


# ---------------------------------------------------------------- walking a schema
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")  # `items` as a list: drafts before 2020-12
_SCHEMA_VALUES = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
                  "contains", "propertyNames", "not", "if", "then", "else")
_WORD = re.compile(r"[A-Za-z_$][\w$-]*")


def _subschemas(node: Any, at: str = "") -> Iterator[tuple[str, dict]]:
    """(path, subschema) of every subschema, in document order; values of `const`, `enum`,
    `default` and `examples` are data, not schemas, and are not entered."""
    if not isinstance(node, dict):
        return
    yield at, node
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _subschemas(sub, f"{at}.{key}" + (f".{name}" if _WORD.fullmatch(name)
                                                              else f"[{json.dumps(name)}]"))
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                yield from _subschemas(sub, f"{at}.{key}[{i}]")
        elif key in _SCHEMA_VALUES:
            yield from _subschemas(value, f"{at}.{key}")


def _where(schema: dict, found) -> str:
    return next((at for at, node in _subschemas(schema) if found(node)), "")


def _node(schema: dict, at: str) -> dict:
    return next((node for path, node in _subschemas(schema) if path == at), schema)


def _path(parts) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


# ---------------------------------------------------------------- dates
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
              r"|02-(?:0[1-9]|1[0-9]|2[0-8]))")
DATE = f"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
DATE_PATTERNS = {"date": f"^{DATE}$", "date-time": f"^{DATE}T{TIME}$", "time": f"^{TIME}$"}


def _dates_as_patterns(schema: dict) -> dict:
    """A copy of `schema` whose date formats are patterns (see the module doc)."""
    held = copy.deepcopy(schema)
    for _, node in list(_subschemas(held)):
        pattern = DATE_PATTERNS.get(node.get("format")) if isinstance(node.get("format"), str) else None
        if pattern is None:
            continue
        del node["format"]
        if "pattern" in node:  # both hold: the date's pattern joins the schema's own
            node["allOf"] = [*node.get("allOf", []), {"pattern": pattern}]
        else:
            node["pattern"] = pattern
    return held

"""Tools of a Responses request, as the model sees them and as the client gets them back.

A local model knows one kind of tool: a chat function with JSON arguments. So every tool
a client runs itself is offered as one, under a name that maps back exactly:

- `function`: as it is; a `namespace` tool's functions (and custom tools) as
  `<namespace>__<name>`, whose calls come back with `name` and `namespace` apart;
- `custom` (freeform input, e.g. Codex's `apply_patch`): a function taking `{"input": ...}`,
  its grammar told in the description; its call comes back as a `custom_tool_call`;
- `local_shell`, `shell`, `apply_patch`: functions whose arguments are what their calls
  carry (`action.command`, `action.commands`, `operation`); their calls come back as
  `local_shell_call`, `shell_call`, `apply_patch_call`.

Each kind is described once here: how it is offered, how a model's call becomes the
client's item, and how that item and its output read when they come back as history.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from ..errors import invalid

# item types a client sends back after running a call, and the call types they answer
CALL_TYPES = {"function_call": "function", "custom_tool_call": "custom", "local_shell_call": "local_shell",
              "shell_call": "shell", "apply_patch_call": "apply_patch"}
OUTPUT_TYPES = ("function_call_output", "custom_tool_call_output", "local_shell_call_output",
                "shell_call_output", "apply_patch_call_output")
CLIENT_TOOLS = ("local_shell", "shell", "apply_patch")
NAMESPACE_SEPARATOR = "__"

STRING = {"type": "string"}
INTEGER = {"type": "integer"}
COMMANDS = {"type": "array", "items": STRING}
OFFERS = {  # the client-run tools without a schema of their own: description, parameters
    "local_shell": ("Runs a command on the user's machine and returns its output.",
                    {"type": "object", "properties": {
                        "command": {**COMMANDS, "description": "the program and its arguments, e.g. "
                                                               "[\"bash\", \"-lc\", \"ls\"]"},
                        "working_directory": STRING, "timeout_ms": INTEGER}, "required": ["command"]}),
    "shell": ("Runs shell commands on the user's machine, one after the other, and returns their output.",
              {"type": "object", "properties": {"commands": COMMANDS, "timeout_ms": INTEGER,
                                                "max_output_length": INTEGER}, "required": ["commands"]}),
    "apply_patch": ("Creates, updates or deletes a file on the user's machine: `diff` is the new file "
                    "(create_file) or a diff of it (update_file).",
                    {"type": "object", "properties": {
                        "type": {"type": "string", "enum": ["create_file", "update_file", "delete_file"]},
                        "path": STRING, "diff": STRING}, "required": ["type", "path"]}),
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True)
class Offered:
    """A tool as the client named it."""

    kind: str                    # function, custom, local_shell, shell, apply_patch
    name: str
    namespace: str | None = None

    @property
    def flat(self) -> str:
        """Its name for the model."""
        return f"{self.namespace}{NAMESPACE_SEPARATOR}{self.name}" if self.namespace else self.name


class ToolNames:
    """The tools a request offers, by the name the model calls them."""

    def __init__(self):
        self.offered: dict[str, Offered] = {}

    def add(self, tool: Offered) -> str:
        name, n = tool.flat, 1
        while name in self.offered:  # a namespaced name that a plain tool also has
            n += 1
            name = f"{tool.flat}_{n}"
        self.offered[name] = tool
        return name

    def flat(self, tool: Offered) -> str:
        """The model's name of a tool a history item names (offered now or not)."""
        for name, offered in self.offered.items():
            if offered == tool:
                return name
        return tool.flat

    def called(self, name: str) -> Offered:
        """The client's tool the model called (a name nobody offered stays a function call)."""
        return self.offered.get(name) or Offered("function", name)


# ---------------------------------------------------------------- offering
def chat_function(name: str, tool: Offered, spec: dict) -> dict:
    """The chat function the model is offered for `tool` (`spec`: the client's tool object)."""
    if tool.kind == "function":
        function = {"name": name, "parameters": spec.get("parameters") or {"type": "object", "properties": {}}}
        if spec.get("description"):
            function["description"] = spec["description"]
        if spec.get("strict") is True:  # its calls are held to its parameters
            function["strict"] = True
    elif tool.kind == "custom":
        description = spec.get("description") or ""
        grammar = spec.get("format") if isinstance(spec.get("format"), dict) else {}
        if grammar.get("type") == "grammar" and grammar.get("definition"):
            description += (f"\n\nPut the whole input in `input`; it must follow this "
                            f"{grammar.get('syntax', '')} grammar:\n{grammar['definition']}")
        function = {"name": name, "description": description.strip() or "Takes free-form text input.",
                    "parameters": {"type": "object", "properties": {"input": STRING}, "required": ["input"]}}
    else:
        description, parameters = OFFERS[tool.kind]
        function = {"name": name, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


# ---------------------------------------------------------------- the model's calls → the client's items
ITEM_TYPES = {kind: item_type for item_type, kind in CALL_TYPES.items()}
ID_PREFIXES = {"function": "fc", "custom": "ctc", "local_shell": "lsh", "shell": "sh", "apply_patch": "apc"}


def call_item(tool: Offered, item_id: str, call_id: str, arguments: str | None) -> dict:
    """The output item for a call the model made (`arguments`: its JSON string; None while
    it is being written: the item as `response.output_item.added` shows it)."""
    item = {"type": ITEM_TYPES[tool.kind], "id": item_id, "call_id": call_id}
    done = arguments is not None
    given = _object(arguments or "")
    if tool.kind in ("function", "custom"):
        item["name"] = tool.name
        if tool.namespace:
            item["namespace"] = tool.namespace
        if tool.kind == "function":
            return {**item, "arguments": arguments or "", "status": "completed" if done else "in_progress"}
        return {**item, "input": (given["input"] if isinstance(given.get("input"), str) else arguments) or ""}
    if tool.kind == "local_shell":
        item["action"] = {"type": "exec", "command": _strings(given.get("command")), "env": {},
                          "timeout_ms": given.get("timeout_ms"), "working_directory": given.get("working_directory"),
                          "user": None}
    elif tool.kind == "shell":
        item["action"] = {"commands": _strings(given.get("commands")), "timeout_ms": given.get("timeout_ms"),
                          "max_output_length": given.get("max_output_length")}
    else:
        operation = {"type": given.get("type", "update_file"), "path": given.get("path", "")}
        if operation["type"] != "delete_file":
            operation["diff"] = given.get("diff", "")
        item["operation"] = operation
    return {**item, "status": "completed" if done else "in_progress"}


def _object(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, list) else []


# ---------------------------------------------------------------- history items → chat
def history_call(item: dict, where: str) -> tuple[Offered, str, str]:
    """(tool, call_id, JSON arguments) of a call item a client sent back."""
    kind = CALL_TYPES[item["type"]]
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"{where}.call_id: Field required (a string)")
    if kind in ("function", "custom"):
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"{where}.name: Field required (a string)")
        namespace = item.get("namespace") if isinstance(item.get("namespace"), str) else None
        if kind == "function":
            arguments = item.get("arguments")
            if not isinstance(arguments, str):
                raise invalid(f"{where}.arguments: Field required (a JSON string)")
        else:
            if not isinstance(item.get("input"), str):
                raise invalid(f"{where}.input: Field required (a string)")
            arguments = json.dumps({"input": item["input"]})
        return Offered(kind, name, namespace), call_id, arguments
    if kind == "apply_patch":
        carried = item.get("operation")
    else:
        carried = item.get("action")
    if not isinstance(carried, dict):
        raise invalid(f"{where}.{'operation' if kind == 'apply_patch' else 'action'}: Field required (an object)")
    if kind == "local_shell":
        carried = {k: carried[k] for k in ("command", "working_directory", "timeout_ms") if carried.get(k)}
    else:
        carried = {k: v for k, v in carried.items() if v is not None}
    return Offered(kind, kind), call_id, json.dumps(carried)


def history_output(item: dict, where: str) -> tuple[str, str]:
    """(call_id, text) of a call's output a client sent back."""
    call_id = item.get("call_id") or (item.get("id") if item["type"] == "local_shell_call_output" else None)
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"{where}.call_id: Field required (a string)")
    output = item.get("output")
    if item["type"] == "shell_call_output":
        return call_id, _shell_output(output, where)
    if item["type"] == "apply_patch_call_output":
        text = output if isinstance(output, str) else ""
        return call_id, text if item.get("status") != "failed" else f"Error: {text or 'the patch failed'}"
    if isinstance(output, str):
        return call_id, output
    if isinstance(output, list):
        return call_id, "".join(_output_part(part, f"{where}.output.{i}") for i, part in enumerate(output))
    raise invalid(f"{where}.output: Field required (a string or a list of content parts)")


def _output_part(part, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return part["text"]
    if kind in ("input_image", "input_file", "input_audio"):
        raise invalid(f"{where}: {kind} content is not supported: the local model reads text only")
    raise invalid(f"{where}: expected an input_text part, got {json.dumps(part, default=str)[:80]}")


def _shell_output(output, where: str) -> str:
    if not isinstance(output, list):
        raise invalid(f"{where}.output: Field required (a list of command outputs)")
    texts = []
    for entry in output:
        if not isinstance(entry, dict):
            raise invalid(f"{where}.output: each entry is an object with stdout, stderr and outcome")
        outcome = entry.get("outcome") if isinstance(entry.get("outcome"), dict) else {}
        ending = ("timed out" if outcome.get("type") == "timeout" else
                  f"exit code {outcome['exit_code']}" if "exit_code" in outcome else "")
        texts.append("".join(str(entry.get(k) or "") for k in ("stdout", "stderr")) + (f"\n({ending})" if ending
                                                                                       else ""))
    return "\n".join(texts)

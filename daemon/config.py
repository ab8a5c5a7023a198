"""Load and validate the gateway configuration.

One YAML file (``config/gateway.yaml`` by default, ``MLXGATE_CONFIG`` to choose
another) plus environment overrides. Every key is declared once in ``SETTINGS``;
``Config`` is derived from it, one field per setting. Unknown keys, wrong types and
bad values fail at load with a ``ConfigError`` that names the file, the key and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import yaml

from . import PROJECT_ROOT
from .errors import ConfigError
from .host_entries import parse_hosts
from .seats import ports as seat_ports

DEFAULT_CONFIG = PROJECT_ROOT / "config" / "gateway.yaml"
DEFAULT_HOME = Path("~/.mlxgate")
API_KEY_FILE = "api_key"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# ---------------------------------------------------------------- value parsers
# Each takes the raw value (from YAML, or a string from the environment) and
# returns the parsed value, or raises ValueError("expected ...").

def _port(value: Any) -> int:
    number = _integer(value)
    if not 1 <= number <= 65535:
        raise ValueError("expected a TCP port between 1 and 65535")
    return number


def _port_or_off(value: Any) -> int:
    """0 (off), or a TCP port."""
    if _integer(value) == 0:
        return 0
    try:
        return _port(value)
    except ValueError:
        raise ValueError("expected a TCP port between 1 and 65535, or 0 to turn it off") from None


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError("expected an integer")


def _positive_int(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise ValueError("expected a positive integer")
    return number


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if number <= 0:
        raise ValueError("expected a positive number of seconds")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value.strip() or None


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a URL such as http://127.0.0.1:11401")
    parsed = urlparse(value)
    if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
        raise ValueError("expected a URL such as http://127.0.0.1:11401")
    return value.rstrip("/")


def _path_list(value: Any) -> tuple[Path, ...]:
    if isinstance(value, str):  # from the environment: colon-separated
        value = [part for part in value.split(os.pathsep) if part]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of folder paths")
    return tuple(Path(item).expanduser() for item in value)


def _text_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _networks(value: Any) -> tuple[str, ...]:
    """IP networks (or single addresses) in CIDR form, each checked, e.g. [127.0.0.1, 10.0.0.0/8]."""
    import ipaddress

    if isinstance(value, str):  # from the environment: comma- or space-separated
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of IP networks such as [127.0.0.1, 192.168.1.0/24]")
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (CIDR such as 10.0.0.0/8)") from None
    return tuple(value)


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise ValueError("expected a host address such as 127.0.0.1")
    return value.strip()


def _aliases(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise ValueError("expected a mapping of alias names to model names")
    return dict(value)


def _model_routes(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in value.items()):
        raise ValueError("expected a mapping of name patterns to `default`, `autocomplete` or a model name")
    return {k.strip().lower(): v.strip() for k, v in value.items()}


def _database_url(value: Any) -> str | None:
    text = _optional_text(value)
    if text is None or text.startswith(("postgresql://", "postgres://")):
        return text
    if "://" in text:
        raise ValueError("expected a postgresql:// URL or a SQLite file path")
    return str(Path(text).expanduser())


_UNITS = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _size(value: Any) -> int:
    text = value.strip().upper().removesuffix("B") if isinstance(value, str) else None
    if text and text[-1:] in _UNITS:
        try:
            number = float(text[:-1])
        except ValueError:
            number = 0
        if number > 0:
            return int(number * _UNITS[text[-1]])
    try:
        return _positive_int(value)
    except ValueError:
        raise ValueError("expected a size in bytes, or with K, M, G or T (e.g. 32M, 1.5G)") from None


def _auto_or_size(value: Any) -> int | None:
    """None for `auto` (the gateway works it out), else a size."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        return _size(value)
    except ValueError:
        raise ValueError("expected auto, or a size with K, M, G or T (e.g. 512M, 24G)") from None


def _size_or_off(value: Any) -> int:
    """0 (off), or a size."""
    if value in (0, "0") or (isinstance(value, str) and value.strip().lower() in ("0", "off", "none")):
        return 0
    try:
        return _size(value)
    except ValueError:
        raise ValueError("expected a size with K, M, G or T (e.g. 20G), or 0 to turn it off") from None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _keep_alive(value: Any) -> float:
    """Seconds a model stays loaded after its last request: -1 (never unload), 0 (unload
    after each request), a number of seconds, or a duration such as 90s, 5m, 2h."""
    problem = "expected -1 (never unload), 0, a number of seconds or a duration such as 5m or 2h"
    if isinstance(value, bool):
        raise ValueError(problem)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        unit = _DURATION_UNITS.get(text[-1]) if text[-1].isalpha() else 1
        try:
            number = float(text[:-1] if text[-1].isalpha() else text) * (unit or 0)
        except ValueError:
            raise ValueError(problem) from None
        if unit is None:
            raise ValueError(problem)
    else:
        raise ValueError(problem)
    if number < 0 and number != -1:
        raise ValueError(problem)
    return number


def _kv_bits(value: Any) -> int | None:
    if value is None:
        return None
    bits = _integer(value)
    if bits not in KV_BITS:
        raise ValueError(f"expected one of {', '.join(map(str, KV_BITS))} (bits per value of the KV cache)")
    return bits


KV_BITS = (2, 3, 4, 6, 8)
def _model_kind(value: Any) -> str:
    if value not in MODEL_KINDS:
        raise ValueError(f"expected one of {', '.join(MODEL_KINDS)} (what the folder's files say, when they say "
                         f"something else)")
    return value


MODEL_KINDS = ("chat", "embedding", "reranker", "vision")
MODEL_SETTINGS = {"pinned": _boolean, "keep_alive": _keep_alive, "prompt_cache": _auto_or_size,
                  "kv_bits": _kv_bits, "kind": _model_kind}


def _models(value: Any) -> dict[str, dict[str, Any]]:
    """Settings of single models, by model name: pinned, keep_alive, prompt_cache, kv_bits."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid("expected a mapping of model names to their settings", got=_kind(value))
    out: dict[str, dict[str, Any]] = {}
    for name, settings in value.items():
        if not isinstance(name, str) or not name.strip():
            raise _Invalid("expected a model name", at=(name,), got=_kind(name))
        if not isinstance(settings, dict):
            raise _Invalid(f"expected a mapping with keys among {', '.join(MODEL_SETTINGS)}", at=(name,),
                           got=_kind(settings))
        parsed = {}
        for key, raw in settings.items():
            if key not in MODEL_SETTINGS:
                raise _Invalid(f"unknown key; expected one of {', '.join(MODEL_SETTINGS)}", at=(name, key),
                               got=repr(key))
            try:
                parsed[key] = MODEL_SETTINGS[key](raw)
            except ValueError as exc:
                raise _Invalid(str(exc), at=(name, key), got=repr(raw)) from None
        out[name.strip()] = parsed
    return out


class _Invalid(ValueError):
    """A problem below a key: `at` is the path under it, `got` says what was found there."""

    def __init__(self, problem: str, got: str, at: tuple = ()):
        super().__init__(problem)
        self.got, self.at = got, at


def _listen(value: Any) -> str | None:
    address = _optional_text(value)
    if address in ("0.0.0.0", "::", "*"):
        raise ValueError("expected the one address other machines reach this one at (its certificate "
                         "carries it), not a wildcard")
    if address is not None:
        _host(address)
    return address


DISTRIBUTED_BACKENDS = ("ring", "jaccl", "mpi")


def _distributed(value: Any) -> dict[str, Any]:
    """One model across machines: `mlx.launch` runs the dynamic server on `hosts` (one
    rank each, the first is this machine), sharded by tensor or `pipeline` parallelism."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict) or not set(value) <= {"hosts", "backend", "pipeline", "starting_port"}:
        raise _Invalid("expected a mapping with keys among hosts, backend, pipeline, starting_port",
                       got=_kind(value) if not isinstance(value, dict) else f"keys {sorted(value)}")
    hosts = value.get("hosts")
    if not isinstance(hosts, list) or len(hosts) < 2 or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise _Invalid("expected a list of at least two addresses, one per rank (the first is this machine)",
                       at=("hosts",), got=_kind(hosts))
    backend = value.get("backend", "ring")
    if backend not in DISTRIBUTED_BACKENDS:
        raise _Invalid(f"expected one of {', '.join(DISTRIBUTED_BACKENDS)}", at=("backend",), got=repr(backend))
    try:
        pipeline = _boolean(value.get("pipeline", False))
        starting_port = _port(value.get("starting_port", 32323))
    except ValueError as exc:
        raise _Invalid(str(exc), got="a bad value") from None
    return {"hosts": [h.strip() for h in hosts], "backend": backend, "pipeline": pipeline,
            "starting_port": starting_port}


LITELLM_SECTIONS = ("model_list", "litellm_settings", "router_settings")


def _kind(value: Any) -> str:
    """What a value is, without showing it (LiteLLM's mappings hold API keys)."""
    kinds = {type(None): "nothing", dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _litellm(value: Any) -> dict[str, Any]:
    """LiteLLM's own config for the deployments that are not local, checked, then passed on untouched."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"expected a mapping with keys among {', '.join(LITELLM_SECTIONS)}", got=_kind(value))
    for key, section in value.items():
        if key not in LITELLM_SECTIONS:
            raise _Invalid(f"unknown key; expected one of {', '.join(LITELLM_SECTIONS)}", at=(key,),
                           got=repr(key))
        if key != "model_list" and not isinstance(section, dict):
            raise _Invalid("expected a mapping", at=(key,), got=_kind(section))
    deployments = value.get("model_list", [])
    if not isinstance(deployments, list):
        raise _Invalid("expected a list of deployments", at=("model_list",), got=_kind(deployments))
    for index, deployment in enumerate(deployments):
        at = ("model_list", index)
        if not isinstance(deployment, dict):
            raise _Invalid("expected a mapping with a string `model_name` and a mapping `litellm_params`",
                           at=at, got=_kind(deployment))
        name = deployment.get("model_name")
        if not isinstance(name, str) or not name.strip():
            raise _Invalid("expected a string, the model name clients send", at=(*at, "model_name"),
                           got=_kind(name))
        params = deployment.get("litellm_params")
        model = params.get("model") if isinstance(params, dict) else None
        if not isinstance(model, str) or not model.strip():
            if not isinstance(params, dict):
                got = _kind(params)
            elif "model" not in params:
                got = "a mapping without `model`"
            else:
                got = f"`model` as {_kind(model)}"
            raise _Invalid("expected a mapping with a string `model` (e.g. anthropic/claude-opus-4-8)",
                           at=(*at, "litellm_params"), got=got)
    return dict(value)


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[Any], Any]
    default: Any
    env: str | None
    help: str
    example: str


SETTINGS: tuple[Setting, ...] = (
    Setting("model_dirs", _path_list, ["~/models"], "MLXGATE_MODEL_DIRS",
            "Folders that hold local models; a model is named by its folder path inside one.",
            "[~/models]"),
    Setting("default_model", _optional_text, None, "MLXGATE_DEFAULT_MODEL",
            "Model for claude-* and gpt-* names: loaded at start, pinned, served on dynamic_port "
            "(a name or a trusted path).",
            "mlx-community/Qwen2.5-Coder-3B-8bit"),
    Setting("autocomplete_model", _optional_text, None, "MLXGATE_AUTOCOMPLETE_MODEL",
            "Small model for the autocomplete alias and *haiku* names: loaded at start, pinned, served on "
            "autocomplete_port (a name or a trusted path).",
            "mlx-community/Qwen2.5-Coder-0.5B-8bit"),
    Setting("embedding_model", _optional_text, None, "MLXGATE_EMBEDDING_MODEL",
            "Embedding model for OpenAI's text-embedding-* names on /v1/embeddings (loaded when first asked "
            "for; a name or a trusted path).",
            "mlx-community/all-MiniLM-L6-v2-bf16"),
    Setting("vision_fallback", _optional_text, None, "MLXGATE_VISION_FALLBACK",
            "Vision model that answers a request holding images which names a text model: the whole request "
            "goes to it, and its answer names it (unset: such a request is a 400 naming the local vision models).",
            "mlx-community/Qwen2.5-VL-3B-Instruct-4bit"),
    Setting("wrapper_url", _url, "http://127.0.0.1:11401", "MLX_WRAPPER_URL",
            "Where the wrapper's management API listens.", "http://127.0.0.1:11401"),
    Setting("dynamic_port", _port, 11402, "MLX_DYNAMIC_PORT",
            "Port of the default model's server; other models get ports the wrapper chooses.", "11402"),
    Setting("autocomplete_port", _port, 11403, "MLX_AUTOCOMPLETE_PORT",
            "Port of the autocomplete model's server.", "11403"),
    Setting("fixed_model", _optional_text, None, "MLXGATE_FIXED_MODEL",
            "Serve every requested name with this one model (no other model is ever loaded).",
            "mlx-community/Qwen2.5-Coder-3B-8bit"),
    Setting("aliases", _aliases, {}, None,
            "Extra names for local models, e.g. {coder: mlx-community/Qwen2.5-Coder-3B-8bit}.",
            "{coder: mlx-community/Qwen2.5-Coder-3B-8bit}"),
    Setting("model_routes", _model_routes, {"*haiku*": "autocomplete"}, None,
            "Name patterns (shell-style, case-insensitive) mapped to `default`, `autocomplete` or a "
            "model name; checked after aliases. Small/fast-class names go to the loaded autocomplete "
            "model so an agent that alternates never forces a swap.",
            "{'*haiku*': autocomplete, 'claude-*': default}"),
    Setting("autocomplete_alias", _optional_text, "autocomplete", "MLXGATE_AUTOCOMPLETE_ALIAS",
            "The model name clients use to reach the autocomplete model.", "autocomplete"),
    Setting("host", _host, "127.0.0.1", "MLXGATE_HOST",
            "Address the proxy listeners bind; 0.0.0.0 exposes the gateway to the network.",
            "127.0.0.1"),
    Setting("port", _port, 11432, "MLXGATE_PORT",
            "Port of the HTTP proxy (Anthropic and OpenAI APIs).", "11432"),
    Setting("enable_https", _boolean, False, "MLXGATE_ENABLE_HTTPS",
            "Also run the HTTPS proxy, with a certificate from the local authority in ssl_dir.",
            "false"),
    Setting("https_port", _port, 11433, "MLXGATE_HTTPS_PORT",
            "Port of the HTTPS proxy.", "11433"),
    Setting("ollama_port", _port_or_off, 11434, "MLXGATE_OLLAMA_PORT",
            "Port of Ollama's API (/api/chat, /api/generate, /api/tags, ...), served by the HTTP proxy on "
            "127.0.0.1 only and without a key, as Ollama serves it; 0 turns it off.", "11434"),
    Setting("ssl_domain", _optional_text, None, "MLXGATE_SSL_DOMAIN",
            "Extra domain the HTTPS certificate is valid for (e.g. api.anthropic.com).",
            "api.anthropic.com"),
    Setting("stand_in_any_key", _boolean, False, "MLXGATE_STAND_IN_ANY_KEY",
            "While standing in for ssl_domain: the HTTPS listener lets in requests from this machine "
            "(loopback) that carry any API key or bearer token, since the real service's clients send "
            "their own. The HTTP listener and other addresses still need the gateway's key.",
            "false"),
    Setting("ssl_dir", _optional_text, None, "MLXGATE_SSL_DIR",
            "Folder of the certificate authority and certificates (default: ssl/ of the checkout).",
            "ssl"),
    Setting("docker_dir", _optional_text, None, "MLXGATE_DOCKER_DIR",
            "Folder of the Docker stack: its docker-compose.yml and the files it mounts (default: docker/ "
            "of the checkout). `mlxgate docker up` writes the stack's .env there.", "docker"),
    Setting("plugin_dirs", _path_list, [], "MLXGATE_PLUGIN_DIRS",
            "Extra folders whose *.py files are loaded as plugins, after the built-in plugins/.",
            "[~/.mlxgate/plugins]"),
    Setting("max_tokens", _positive_int, 8192, "MAX_TOKENS",
            "Cap on the tokens one answer may generate.", "8192"),
    Setting("load_timeout", _seconds, 600, "MLXGATE_LOAD_TIMEOUT",
            "Seconds a model may take to load before the load fails.", "600"),
    Setting("max_body", _size, "32M", "MLXGATE_MAX_BODY",
            "Largest request body the proxy accepts; larger ones get 413.", "32M"),
    Setting("max_queue", _positive_int, 16, "MLXGATE_MAX_QUEUE",
            "Requests that may wait per model; more get 529 (Anthropic) or 503 (OpenAI).", "16"),
    Setting("max_parallel", _positive_int, 8, "MLXGATE_MAX_PARALLEL",
            "Requests one model's server works on at once, batched by mlx_lm.server.", "8"),
    Setting("drain_timeout", _seconds, 120, "MLXGATE_DRAIN_TIMEOUT",
            "Seconds an unload (or `mlxgate unload`) waits for the model's requests before ending them.", "120"),
    Setting("stall_timeout", _seconds, 30, "MLXGATE_STALL_TIMEOUT",
            "Seconds a model server may go without answering the watchdog's look (its generation loop "
            "stalled, or the process stopped) while using no CPU; then it is restarted with the same model, "
            "busy or idle, and its requests get an error.", "30"),
    # ---- the resident set (see "Models that stay loaded" in the README)
    Setting("memory_budget", _auto_or_size, "auto", "MLXGATE_MEMORY_BUDGET",
            "Memory the resident models may use together: weights, prompt cache allowance and process "
            "each. auto: the Metal recommended working set less 10 % (at least 1 GiB) on macOS, 70 % of "
            "physical memory elsewhere. A model that does not fit evicts the least recently used idle ones.",
            "24G"),
    Setting("keep_alive", _keep_alive, "30m", "MLXGATE_KEEP_ALIVE",
            "How long a model stays loaded after its last request (seconds, or 90s, 5m, 2h); 0 unloads after "
            "each request, -1 never. Pinned models stay.", "30m"),
    Setting("prompt_cache", _auto_or_size, "auto", "MLXGATE_PROMPT_CACHE",
            "Bytes of prompt (KV) cache each model server may keep, counted in its cost. auto: the KV cache of "
            "64K tokens (or the model's window) from its config, from 256M to a quarter of the budget.",
            "2G"),
    Setting("prompt_cache_disk", _size_or_off, "20G", "MLXGATE_PROMPT_CACHE_DISK",
            "Disk the prompt caches of all models may use in the runtime folder (kv/): long prefixes that "
            "leave memory (unload, restart, eviction) are kept there and read back instead of prefilled. "
            "0 turns the tier off.", "20G"),
    Setting("image_fetch_allow", _networks, [], "MLXGATE_IMAGE_FETCH_ALLOW",
            "Networks URL images may be fetched from although they are loopback, link-local or private (the "
            "gateway fetches image URLs itself, and by default only from global addresses).",
            "[192.168.1.0/24]"),
    Setting("models", _models, {}, None,
            "Settings of single models by name: pinned (loaded at start, never evicted), keep_alive, "
            "prompt_cache, kv_bits (a quantized KV cache: about half the memory at 8 bits, but that model's "
            "requests are served one at a time).",
            "{mlx-community/Qwen3-30B-A3B-4bit: {pinned: true, kv_bits: 8}}"),
    Setting("server_args", _text_list, [], None,
            "Extra command-line arguments for every mlx_lm.server (e.g. --kv-bits 8).", "[]"),
    Setting("detailed_debug", _boolean, False, "DETAILED_DEBUG",
            "Log each request as the hooks changed it (API keys are always redacted).", "false"),
    Setting("record_usage", _boolean, True, "MLXGATE_RECORD_USAGE",
            "Record each request: the request counts of /metrics, the status page and the usage ledger "
            "(off: none of them, e.g. as a benchmark's baseline).", "true"),
    Setting("database_url", _database_url, None, "MLXGATE_DATABASE_URL",
            "Where the usage ledger is written: a postgresql:// URL, or a SQLite file path; none means "
            "usage.sqlite in the runtime folder.",
            "postgresql://mlxgate@localhost/mlxgate"),
    Setting("litellm", _litellm, {}, None,
            "Deployments that are not local, served by LiteLLM inside the proxy program: LiteLLM's own "
            "model_list, litellm_settings and router_settings.",
            "{model_list: [{model_name: claude-opus-4-8, litellm_params: {model: anthropic/claude-opus-4-8, "
            "api_key: os.environ/ANTHROPIC_API_KEY}}]}"),
    # ---- several machines (see `mlxgate.hosts`)
    Setting("listen", _listen, None, "MLXGATE_LISTEN",
            "Address other gateways reach this machine's relay at, over TLS with the key (its "
            "certificate carries it); none: the relay serves loopback only.", "192.168.1.20"),
    Setting("listen_port", _port, 11435, "MLXGATE_LISTEN_PORT",
            "Port of the relay's TLS listener on the listen address.", "11435"),
    Setting("hosts", parse_hosts, [], None,
            "Other mlxgate machines requests may go to, each {name, url, ca_sha256}; "
            "`mlxgate hosts add` writes them.",
            "[{name: studio, url: 'https://192.168.1.20:11435', ca_sha256: 9f86d0...}]"),
    Setting("distributed", _distributed, {}, None,
            "Serve the default model across machines with mlx.launch: {hosts: [addresses, one per rank, "
            "this machine first], backend: ring, pipeline: false, starting_port: 32323}.",
            "{hosts: [10.0.0.1, 10.0.0.2], backend: ring}"),
)

SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}


class _Derived:
    """What `Config` computes from its settings."""

    @property
    def wrapper_host(self) -> str:
        return urlparse(self.wrapper_url).hostname or "127.0.0.1"

    @property
    def wrapper_port(self) -> int:
        return urlparse(self.wrapper_url).port or 11401

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def ssl_path(self) -> Path:
        return Path(self.ssl_dir).expanduser() if self.ssl_dir else PROJECT_ROOT / "ssl"

    @property
    def docker_path(self) -> Path:
        return Path(self.docker_dir).expanduser() if self.docker_dir else PROJECT_ROOT / "docker"

    @property
    def local_host(self) -> str:
        """Where a client on this machine reaches the proxy listeners."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self.local_host}:{self.port}"

    @property
    def https_url(self) -> str:
        return f"https://{self.ssl_domain or 'localhost'}:{self.https_port}"


# One field per setting, typed by what its parser returns, then what is not a setting.
Config = make_dataclass(
    "Config",
    [(s.key, s.parse.__annotations__["return"]) for s in SETTINGS] + [
        ("home", Path, field(default=DEFAULT_HOME.expanduser())),
        ("source", "Path | None", field(default=None)),
        ("api_key", "str | None", field(default=None)),
        ("hf_cache", Path, field(default=Path("~/.cache/huggingface/hub").expanduser())),
    ],
    bases=(_Derived,), frozen=True,
    namespace={"__module__": __name__,
               "__doc__": "The validated configuration; build it with `load_config`."})


def config_path(env: Mapping[str, str] = os.environ) -> Path:
    """The config file in use: ``MLXGATE_CONFIG`` or ``config/gateway.yaml``."""
    return Path(env["MLXGATE_CONFIG"]).expanduser() if env.get("MLXGATE_CONFIG") else DEFAULT_CONFIG


def runtime_home(env: Mapping[str, str] = os.environ) -> Path:
    """The runtime folder (logs, generated files): ``MLXGATE_HOME`` or ``~/.mlxgate``."""
    return Path(env.get("MLXGATE_HOME") or DEFAULT_HOME).expanduser().resolve()


def hf_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the Hugging Face hub keeps downloaded models, by its own rules."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return base / "huggingface" / "hub"


# What the daemon's environment may hold that its model servers never get.
SECRET_VARIABLES = ("MLXGATE_API_KEY", "MLXGATE_DATABASE_URL")


def read_api_key(home: Path, env: Mapping[str, str] = os.environ) -> str | None:
    """The API key: ``MLXGATE_API_KEY``, else the key file in the runtime folder."""
    if env.get("MLXGATE_API_KEY"):
        return env["MLXGATE_API_KEY"]
    key_file = home / API_KEY_FILE
    if key_file.is_file():
        return key_file.read_text().strip() or None
    return None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror}). Fix: check its permissions.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}. Fix: correct the syntax "
                          f"(compare with config/gateway.example.yaml).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, "
                          f"got {type(data).__name__}. Fix: write one `key: value` per line.")
    return data


def load_config(path: Path | None = None, env: Mapping[str, str] = os.environ,
                overrides: Mapping[str, Any] | None = None,
                start_flags: Mapping[str, Any] | None = None) -> Config:
    """Read the file, then apply `start_flags`, environment variables and `overrides`.

    Precedence: flags given now (`overrides`) > environment > flags saved by the last
    `mlxgate start` (`start_flags`) > file > defaults.
    """
    path = Path(path) if path is not None else config_path(env)
    raw = _read_file(path)
    unknown = sorted(set(raw) - set(SETTINGS_BY_KEY))
    if unknown:
        known = ", ".join(SETTINGS_BY_KEY)
        raise ConfigError(f"{path}: {unknown[0]}: unknown key. Fix: remove it or use one of: {known}.")

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flag = f"option --{setting.key.replace('_', '-')}"
        value, where = setting.default, f"{path}: {setting.key}"
        if setting.key in raw:
            value = raw[setting.key]
        if start_flags and start_flags.get(setting.key) is not None:
            value, where = start_flags[setting.key], f"{flag} saved by the last `mlxgate start`"
        if setting.env and setting.env in env:
            value, where = env[setting.env], f"environment variable {setting.env}"
        if overrides and overrides.get(setting.key) is not None:
            value, where = overrides[setting.key], flag
        try:
            values[setting.key] = setting.parse(value)
        except ValueError as exc:
            at, got = (exc.at, exc.got) if isinstance(exc, _Invalid) else ((), repr(value))
            below = "".join(f".{part}" for part in at)
            raise ConfigError(f"{where}{below}: {exc}, got {got}. "
                              f"Fix: set it like `{setting.key}: {setting.example}`.") from None

    ports = {**seat_ports(values), "wrapper_url": urlparse(values["wrapper_url"]).port, "port": values["port"]}
    if values["enable_https"]:
        ports["https_port"] = values["https_port"]
    if values["listen"]:
        ports["listen_port"] = values["listen_port"]
    if values["ollama_port"]:
        ports["ollama_port"] = values["ollama_port"]
    if values["fixed_model"]:
        values["default_model"] = values["fixed_model"]
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"{path}: {', '.join(ports)} must all differ, got {ports}. "
                          f"Fix: give each its own port.")

    home = runtime_home(env)
    return Config(**values, home=home, source=path if path.exists() else None,
                  api_key=read_api_key(home, env), hf_cache=hf_cache_dir(env))

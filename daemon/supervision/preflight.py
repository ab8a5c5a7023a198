"""What `mlxgate start` checks before supervisord runs anything: the plugins load, the models it
loads are on this machine, standing in cannot loop, and the ports are free. Each failure names
the fix."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import Config
from ..errors import MlxgateError


def check(config: Config, port_wait: float = 0.0) -> None:
    """Every check, in the order a person would fix them; the first failure is raised."""
    from ..plugins import make_manager

    make_manager(config.plugin_dirs)  # a broken plugin stops the start here, with file and line
    check_models(config)
    check_stand_in(config)
    check_ports(config, port_wait)


def check_ports(config: Config, wait: float = 0.0) -> None:
    """Refuse a port another process holds; `wait` seconds are given to one that may be
    closing (the service starting again right after the group went down)."""
    from ..net import port_in_use

    from .. import seats

    wanted = {"port": (config.host, config.port), "wrapper_url": (config.wrapper_host, config.wrapper_port),
              **{key: ("127.0.0.1", port) for key, port in seats.ports(config).items()}}
    if config.enable_https:
        wanted["https_port"] = (config.host, config.https_port)
    if config.listen:
        wanted["listen_port"] = (config.listen, config.listen_port)
    if config.ollama_port:
        wanted["ollama_port"] = ("127.0.0.1", config.ollama_port)
    deadline = time.monotonic() + wait
    for key, (host, port) in wanted.items():
        host = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
        while port >= 1024 and port_in_use(port, host):
            if time.monotonic() >= deadline:
                fix = PORT_FIXES.get(key) or f"choose another port (--{key.replace('_', '-')} or {key} in the config)"
                raise MlxgateError(f"port {port} ({key}) is already in use by another process. Fix: stop it, "
                                   f"or {fix}.")
            time.sleep(0.5)


PORT_FIXES = {  # a port whose fix is not a flag of `mlxgate start`
    "ollama_port": "if it is Ollama itself, set `ollama_port: 0` in the config (or MLXGATE_OLLAMA_PORT=0) to "
                   "leave Ollama's port to it, or give mlxgate's Ollama API another one (`ollama_port: 11436`)",
}


def missing_models(config: Config) -> list[tuple[str, str]]:
    """(setting, name) of each model the start loads that is not on this machine."""
    from .. import seats
    from ..catalog import for_config, is_model_folder
    from ..errors import UnknownModel

    catalog = for_config(config)
    missing = []
    for seat, name in seats.configured(config):
        key = seat.model_key
        try:
            found = is_model_folder(catalog.resolve(name).path)
        except UnknownModel:
            found = False
        if not found:
            missing.append((key, name))
    return missing


def check_models(config: Config) -> None:
    """A missing model fails the start now, not after the programs started and its load timed out."""
    for key, name in missing_models(config)[:1]:
        raise MlxgateError(missing_model(config, name, key))


MODEL_FIXES = "Fix, one of:"


def missing_model(config: Config, name: str, key: str) -> str:
    """What to do about a model that is not on this machine: the three ways to get one."""
    dirs = ", ".join(str(d) for d in config.model_dirs) or "(none)"
    demo = (config.model_dirs[0] if config.model_dirs else Path("~/models")) / "tiny"
    return (f"model {name!r} ({key}) is not on this machine: not in the model directories ({dirs}) nor in "
            f"the Hugging Face cache ({config.hf_cache}). {MODEL_FIXES}\n"
            f"  mlxgate download {name}            fetch it from the Hugging Face hub, then start again\n"
            f"  mlxgate start --download-model {name}   download it, then start with it\n"
            f"  mlxgate demo-model {demo}   a tiny offline model to try the stack, then start with "
            f"--{key.replace('_', '-')} tiny")


def check_stand_in(config: Config) -> None:
    """While standing in for ssl_domain, a LiteLLM deployment that calls that domain would
    reach this gateway again (the hosts entry points the name here)."""
    from urllib.parse import urlparse

    if not config.ssl_domain:
        return
    for index, deployment in enumerate((config.litellm or {}).get("model_list") or []):
        params = deployment["litellm_params"]
        base = params.get("api_base")
        calls = (urlparse(base).hostname if base else
                 "api.anthropic.com" if params["model"].startswith("anthropic/") else None)
        if calls == config.ssl_domain:
            raise MlxgateError(
                f"litellm.model_list.{index} ({deployment['model_name']}: {params['model']}) would call "
                f"{config.ssl_domain}, which this gateway stands in for (ssl_domain): its requests would come "
                f"back here. Fix: give it an `api_base` that reaches the real service by another name or "
                f"address, remove it from the litellm: section, or stop standing in (no --ssl-domain "
                f"{config.ssl_domain}).")

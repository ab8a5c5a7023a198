"""A small client for the wrapper's management API, used by the CLI."""

from __future__ import annotations

from typing import Any

import requests

from .errors import MlxgateError

class WrapperError(MlxgateError):
    """The wrapper answered with an error; `status` and `kind` say which."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind


class WrapperClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 900.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, payload: dict | None = None) -> Any:
        try:
            response = self.session.request(method, self.url + path, json=payload, timeout=self.timeout)
        except requests.ConnectionError:
            raise WrapperError(f"the wrapper is not running at {self.url}. Start it with "
                               f"`mlxgate wrapper` (or the whole gateway with `mlxgate start`).",
                               status=None, kind="wrapper_down") from None
        except requests.Timeout:
            raise WrapperError(f"the wrapper at {self.url} did not answer {method} {path} "
                               f"within {self.timeout:g} s", kind="timeout") from None
        try:
            data = response.json()
        except ValueError:
            data = {"error": {"type": "invalid_response", "message": response.text[:300]}}
        if response.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise WrapperError(err.get("message") or f"HTTP {response.status_code}",
                               status=response.status_code, kind=err.get("type"))
        return data

    def health(self) -> dict:
        return self._call("GET", "/health")

    def models(self) -> dict:
        return self._call("GET", "/models")

    def load(self, model: str) -> dict:
        return self._call("POST", "/models/load", {"model": model})

    def unload(self, model: str) -> dict:
        return self._call("POST", "/models/unload", {"model": model})

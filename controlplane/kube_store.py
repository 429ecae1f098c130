"""`KubeStore`: the ObjectStore on a Kubernetes API server through the kubernetes client —
its configuration (kubeconfig, in-cluster service account), TLS and authentication (token
refresh, exec plugins) as kubectl would use them; the rules are ApiStore's (kube_api_store).

This is the only module that imports `kubernetes` (tests/test_layers.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import urllib3
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration

from csi import __version__
from controlplane.kube_api_store import ApiStore
from controlplane.kube_kinds import ApiError, Obj
from controlplane.store import Conflict
from controlplane.user_text import one_line

__all__ = ["KubeStore", "Conflict", "ApiError", "KubeConfigError"]

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubeConfigError(ValueError):
    """No usable configuration to reach a cluster (one line saying what was looked for)."""


class _LineStream:
    """A watch response, one decoded JSON event per line."""

    def __init__(self, response: urllib3.BaseHTTPResponse):
        self._response = response

    def __iter__(self) -> Iterator[Obj]:
        buffer = bytearray()
        for chunk in self._response.stream(amt=None, decode_content=True):
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line, buffer = bytes(buffer[:end]).strip(), buffer[end + 1:]
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        try:
            self._response.shutdown()  # wakes a read blocked in another thread
        except Exception:  # already closed
            pass
        self._response.close()


class ClientTransport:
    """REST calls through the kubernetes client's ApiClient: its configuration, TLS and
    authentication (token refresh, exec plugins) as kubectl would use them; JSON dicts in
    and out."""

    def __init__(self, client: ApiClient):
        self.client = client

    def _call(self, method: str, path: str, query: dict[str, Any] | None, body: Any, content_type: str,
              timeout: Any) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.client.param_serialize(
            method, path, query_params=dict(query or {}), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            return self.client.call_api(method, url, headers, body, _request_timeout=timeout)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, "Unreachable", f"{method} {path}: cannot reach the API server at "
                           f"{self.client.configuration.host}: {one_line(str(exc), 200)}") from None

    @staticmethod
    def _error(method: str, path: str, status: int, data: bytes) -> ApiError:
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        reason = str(body.get("reason") or "")
        message = one_line(str(body.get("message") or data[:200].decode(errors="replace") or "no message"))
        return ApiError(status, reason, f"{method} {path}: {status} {reason or 'error'}: {message}")

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json", timeout: float = 30.0) -> Obj:
        response = self._call(method, path, query, body, content_type, timeout)
        data = response.read()
        if not 200 <= response.status < 300:
            raise self._error(method, path, response.status, data)
        return json.loads(data) if data else {}

    def watch(self, path: str, query: dict[str, Any], seconds: int) -> _LineStream:
        response = self._call("GET", path, dict(query, timeoutSeconds=seconds), None, "application/json",
                              (10.0, seconds + 30.0))
        if response.status != 200:
            raise self._error("GET", path, response.status, response.read())
        return _LineStream(response.response)


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(SERVICE_ACCOUNT_TOKEN)



USER_AGENT = f"pvlun/{__version__}"


class KubeStore(ApiStore):
    """The ObjectStore on a Kubernetes API (see ApiStore). `namespace` is where an object
    that names none goes (as kubectl's context namespace); `watch_namespace` limits the
    informers to one namespace (None: all); `reporter` is the Events' reportingController."""

    def __init__(self, client: ApiClient, namespace: str = "default", **options: Any):
        super().__init__(ClientTransport(client), namespace, **options)
        self.client = client

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None, namespace: str = "default",
                        **options: Any) -> "KubeStore":
        """A store on the cluster a kubeconfig names; with no path, the in-cluster service
        account when running in a Pod, else $KUBECONFIG, else ~/.kube/config."""
        configuration = Configuration()
        try:
            if path is None and context is None and _in_cluster():
                kube_config.load_incluster_config(client_configuration=configuration)
            else:
                path = path or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
                if not any(os.path.isfile(p) for p in path.split(os.pathsep) if p):
                    raise KubeConfigError(f"no kubeconfig at {path[:200]} (and not running in a cluster): "
                                          "give --kubeconfig or set KUBECONFIG")
                kube_config.load_kube_config(config_file=path, context=context, client_configuration=configuration,
                                             persist_config=False)
        except kube_config.ConfigException as exc:
            raise KubeConfigError(f"cannot use the Kubernetes configuration: {one_line(str(exc), 300)}") from None
        configuration.connection_pool_maxsize = 64  # a watch per kind holds a connection
        client = ApiClient(configuration)
        client.user_agent = USER_AGENT  # audit logs (and tests) tell pvlun's calls apart
        return cls(client, namespace, **options)

    def stop(self) -> None:
        super().stop()
        self.client.close()

    close = stop

"""`KubeStore`: the ObjectStore on a Kubernetes API server through the kubernetes client —
its configuration (kubeconfig, in-cluster service account), TLS and authentication (token
refresh, exec plugins) as kubectl would use them; the rules are ApiStore's (kube_api_store).

This is the only module that imports `kubernetes` (tests/test_layers.py).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

import urllib3
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration
from kubernetes.stream import ws_client
from websocket import WebSocketBadStatusException  # the kubernetes client's websocket library

from csi import __version__
from controlplane.kube_api_store import ApiStore
from controlplane.kube_kinds import ApiError, KINDS, Obj, checked_name, checked_namespace
from controlplane.pod_exec import EXEC_TIMEOUT, BoundedOutput, ExecResult, exit_code
from controlplane.store import Conflict
from controlplane.user_text import one_line

__all__ = ["KubeStore", "Conflict", "ApiError", "KubeConfigError"]

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
STATUS_LIMIT = 64 << 10  # bytes of the exec stream's error channel (one metav1.Status)
ARGV_LIMIT = 64 << 10  # bytes of a command line sent in the exec URL


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


def _refused(exc: Exception, where: str) -> ApiError:
    """The API server's answer to an exec handshake it refused (403, 404, 400 for a Pod that
    does not run: a metav1.Status body), or why it could not be reached, as one line."""
    if not isinstance(exc, WebSocketBadStatusException):
        return ApiError(0, "Unreachable", f"exec in {where}: {one_line(str(exc), 200)}")
    try:
        status = json.loads(exc.resp_body or b"{}")
    except ValueError:
        status = {}
    status = status if isinstance(status, dict) else {}
    reason = status.get("reason") if isinstance(status.get("reason"), str) else ""
    message = status.get("message") if isinstance(status.get("message"), str) else exc.status_message or "refused"
    return ApiError(exc.status_code, one_line(reason, 64),
                    f"exec in {where}: {exc.status_code} {one_line(reason, 64) or 'error'}: {one_line(str(message), 300)}")


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

    def exec(self, namespace: str, pod: str, container: str, argv: list[str], stdin: bytes | None = None,
             timeout: float = EXEC_TIMEOUT) -> ExecResult:
        """Run `argv` in the Pod's container (pods/exec over a websocket, channel protocol v5 or
        v4 as the server chooses, as kubectl exec) and wait up to `timeout` s for its exit
        code; `stdin`, when given, is sent and then closed (v5; a v4 server never sees the
        end of stdin). stdout and stderr are kept up to OUTPUT_LIMIT each. Raises ApiError
        (one line) when the API server refuses, the stream breaks or the time is up."""
        where = f"{checked_namespace(namespace)}/{checked_name(pod)} ({checked_name(container)})"
        if not argv or not all(isinstance(a, str) for a in argv) or sum(len(a.encode()) for a in argv) > ARGV_LIMIT:
            raise ValueError(f"exec in {where}: the command must be a non-empty list of strings, {ARGV_LIMIT} bytes at most")
        query = [("command", a) for a in argv] + [("container", container), ("stdin", stdin is not None),
                                                   ("stdout", True), ("stderr", True), ("tty", False)]
        _, url, headers, _, _ = self.client.param_serialize(
            "GET", KINDS["Pod"].path(namespace, pod, "exec"), query_params=query, header_params={},
            auth_settings=["BearerToken"])
        try:  # the client's own websocket exec, without its copy of all output (capture_all)
            ws = ws_client.WSClient(self.client.configuration, ws_client.get_websocket_url(url), headers,
                                    capture_all=False, binary=True)
        except Exception as exc:  # noqa: BLE001 - the websocket library's refusals are plain exceptions
            raise _refused(exc, where) from None
        try:
            return self._collect(ws, stdin, time.monotonic() + timeout, timeout, where)
        finally:
            ws.close()

    @staticmethod
    def _collect(ws: Any, stdin: bytes | None, deadline: float, timeout: float, where: str) -> ExecResult:
        out, err, status = BoundedOutput(), BoundedOutput(), BoundedOutput(STATUS_LIMIT)
        try:
            if stdin is not None:
                ws.write_stdin(stdin)
                ws.close_channel(ws_client.STDIN_CHANNEL)
            while ws.is_open():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, "Timeout", f"exec in {where}: no exit status within {timeout:g} s")
                ws.update(timeout=min(left, 1.0))
                for channel, sink in ((ws_client.STDOUT_CHANNEL, out), (ws_client.STDERR_CHANNEL, err),
                                      (ws_client.ERROR_CHANNEL, status)):
                    sink.add(ws.read_channel(channel))
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream (the websocket library's exceptions)
            if not status.data:
                raise ApiError(0, "StreamError", f"exec in {where}: the stream broke: {one_line(str(exc), 200)}") \
                    from None
        code = exit_code(bytes(status.data), where)
        return ExecResult(code, bytes(out.data), bytes(err.data), out.dropped or err.dropped)

    def stop(self) -> None:
        super().stop()
        self.client.close()

    close = stop

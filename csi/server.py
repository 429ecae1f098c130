"""The gRPC server: endpoint parsing, the services a mode needs, one log line per call,
error mapping (CsiError → its status; a failed tool → INTERNAL with its stderr; never a
traceback, a Python repr, a pool path or a whole echoed input to the caller: every message
passes `public_message`), socket mode 0600."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent import futures
from typing import Any, Callable

import grpc

from csi.errors import CsiError, public_message, shown
from host.command import CommandError

log = logging.getLogger("pvlun.csi")
calls = logging.getLogger("pvlun.calls")

_VOLUME_FIELDS = ("volume_id", "source_volume_id", "snapshot_id", "group_snapshot_id", "name")


UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def _socket_path(path: str) -> str:
    """The path, if the kernel can bind a socket there (else a ValueError a person can act on)."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise ValueError(f"socket {path[:60]}... is {size} bytes long; a Unix socket path may have at most "
                         f"{UNIX_PATH_MAX} (choose a shorter --data-dir or --endpoint)")
    return path


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """('unix', path) or ('tcp', 'host:port') for a CSI endpoint URL."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
        if not path.startswith("/"):
            raise ValueError(f"endpoint {endpoint!r}: a unix socket path must be absolute (unix:///path)")
        return "unix", _socket_path(path)
    if endpoint.startswith("tcp://"):
        return "tcp", endpoint[len("tcp://"):]
    if endpoint.startswith("/"):
        return "unix", _socket_path(endpoint)
    raise ValueError(f"endpoint {endpoint!r}: use unix:///PATH or tcp://HOST:PORT")


def _subject(request: Any, response: Any = None) -> str:
    created = getattr(getattr(response, "volume", None), "volume_id", "") if response is not None else ""
    if created:
        return created
    for name in _VOLUME_FIELDS:
        value = getattr(request, name, "") if hasattr(type(request), "DESCRIPTOR") and name in type(request).DESCRIPTOR.fields_by_name else ""
        if value:
            return value if len(value) <= 128 and value.isprintable() else shown(value)
    return ""


def _internal(method: str, exc: Exception) -> str:
    """What a caller learns of an unexpected failure: the system's reason for an OSError
    (no file names), else only that the driver's log has it."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"internal error in {method}: {exc.strerror}"
    return f"internal error in {method}; the driver's log has the details"


class CallInterceptor(grpc.ServerInterceptor):
    """Logs each call as one JSON line and maps exceptions to gRPC statuses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def wrapped(request, context):
            start = time.monotonic()
            code = grpc.StatusCode.OK
            response = None
            try:
                response = inner(request, context)
                return response
            except CsiError as exc:
                code = exc.code
                context.abort(exc.code, public_message(exc.message))
            except CommandError as exc:
                code = grpc.StatusCode.INTERNAL
                context.abort(code, public_message(str(exc)))
            except Exception as exc:
                if context.code() not in (None, grpc.StatusCode.OK):  # context.abort() from a service
                    code = context.code()
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                context.abort(code, _internal(method, exc))
            finally:
                calls.info(json.dumps({
                    "time": round(time.time(), 3), "method": method, "volume": _subject(request, response),
                    "duration_ms": round((time.monotonic() - start) * 1000, 2), "code": code.name}))

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def build_server(endpoint: str, register: list[Callable[[grpc.Server], None]], workers: int = 16) -> grpc.Server:
    """A started server on `endpoint` with the given services; unix sockets get mode 0600."""
    kind, where = parse_endpoint(endpoint)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[CallInterceptor()])
    for add in register:
        add(server)
    if kind == "unix":
        os.makedirs(os.path.dirname(where), exist_ok=True)
        if os.path.exists(where):
            os.unlink(where)
        old = os.umask(0o177)
        try:
            _listen(server, "unix://" + where, endpoint)
            server.start()
        finally:
            os.umask(old)
        os.chmod(where, 0o600)
    else:
        _listen(server, where, endpoint)
        server.start()
    return server


def _listen(server: grpc.Server, address: str, endpoint: str) -> None:
    """Bind, or OSError naming the endpoint (grpc raises RuntimeError or returns 0, by version)."""
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {endpoint} (in use, or not a place a socket can be made)")


def setup_logging(level: int = logging.INFO) -> None:
    """Human-readable lines for the driver's own messages; the per-call records are pure JSON
    lines (one per RPC) so that log collectors can parse them as they are."""
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    calls.addHandler(handler)
    calls.propagate = False

"""TEST DOUBLE of a Kubernetes API server — no Kubernetes API server can run on the test
machines, so KubeStore's tests talk to this one. Never imported by the product.

A real HTTP/1.1 server on 127.0.0.1 (a thread per connection) speaking the REST the
kubernetes client speaks, for every resource in kube_api_storage.SERVED: list (a `KindList`
with metadata.resourceVersion; limit and continue), get, create, update, /status, merge
and JSON patch, delete, and watch (`?watch=1`: JSON lines ADDED/MODIFIED/DELETED, BOOKMARK
with allowWatchBookmarks, from a resourceVersion, ended after timeoutSeconds) on
namespaced and cluster-scoped paths, with a bearer token; errors are Status objects
(404 NotFound, 409 Conflict/AlreadyExists, 410 Expired, 422 Invalid, 401).

Knobs for the cases a real server shows only under load or over time:
- `expire_history()`: every version seen so far is compacted away, so a watch from one of
  them answers 410 (an ERROR event in the stream, as the API server does, or with
  `gone_as_http=True` the HTTP status) — the client must list again;
- `drop_watches()`: every open watch stream is cut (the connection closed mid-stream);
- `holding_watches()`: while in it, new watch requests wait (so changes made meanwhile can
  only reach a client through its next watch, or a relist);
- `unserve(kind)`: the resource is not served (a CRD not installed): 404 everywhere;
- `requests`: every request seen, (method, path, query), for asserting what a client did;
- `exec_runner`: how pods/exec (a websocket, kube_ws_exec) runs a command "in" a Pod: the
  Pod, the container and the argv → a local argv run as a subprocess (None: not found).
  The Pod must exist, name the container and run on a node (the API server's own checks);
  `execs` lists every command run, (namespace, pod, container, argv).
`write_kubeconfig(path)` writes a kubeconfig pointing at it, so a client is built exactly
as for a real cluster.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from kube_api_storage import SERVED, ApiStatus, ApiStorage, Obj, Resource, dumps, matches, status_body
from kube_ws_exec import ExecRunner, ExecSession, accept_key, choose_protocol

BOOKMARK_EVERY = 0.5  # seconds between bookmarks of an idle watch


class KubeApiDouble:
    def __init__(self, bookmark_every: float = BOOKMARK_EVERY):
        self.storage = ApiStorage()
        self.token = secrets.token_hex(16)
        self.bookmark_every = bookmark_every
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.agents: list[str] = []  # each request's User-Agent (which client made it)
        self.gone_as_http = False
        self._compacted = 0  # watches from a version below this (etcd's compacted revision) are answered 410
        self._drops = 0  # bumped by drop_watches: streams started before end
        self._unserved: set[str] = set()
        self._open: dict[str, int] = {}  # plural → watch streams open now
        self._admit = threading.Event()
        self._admit.set()
        self._pages: dict[str, list[Obj]] = {}
        self.exec_runner: ExecRunner | None = None
        self.execs: list[tuple[str, str, str, list[str]]] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False
        double = self

        class Handler(_Handler):
            api = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="kube-api-double",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "KubeApiDouble":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._admit.set()
        with self.storage.cond:
            self.storage.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._conns):
                _shut(conn)
        self._thread.join(5)

    def write_kubeconfig(self, path: str, namespace: str = "default") -> str:
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "double",
                  "clusters": [{"name": "double", "cluster": {"server": self.url}}],
                  "users": [{"name": "double", "user": {"token": self.token}}],
                  "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double",
                                                              "namespace": namespace}}]}
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        return path

    # ---- knobs
    def expire_history(self) -> None:
        with self.storage.cond:
            self._compacted = self.storage.rv

    def drop_watches(self) -> None:
        with self.storage.cond:
            self._drops += 1
            self.storage.cond.notify_all()

    @contextmanager
    def holding_watches(self) -> Iterator[None]:
        self._admit.clear()
        try:
            yield
        finally:
            self._admit.set()

    def unserve(self, kind: str) -> None:
        self._unserved.add(kind)

    def watches(self, plural: str) -> int:
        """How many watch requests of the resource were made."""
        return sum(1 for m, p, q in self.requests if p.endswith("/" + plural) and q.get("watch") in ("1", "true"))

    def open_watches(self, plural: str) -> int:
        """How many watch streams of the resource are open (sending) now."""
        with self.storage.cond:
            return self._open.get(plural, 0)

    def lists(self, plural: str) -> int:
        return sum(1 for m, p, q in self.requests if m == "GET" and p.endswith("/" + plural)
                   and q.get("watch") not in ("1", "true") and not q.get("continue"))

    # ---- raw access, for tests that play another client
    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Obj]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self._server.server_address[1], timeout=10)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    # ---- routing
    def resource(self, path: str) -> tuple[Resource, str | None, str | None, str]:
        """(resource, namespace or None, name or None, subresource) of a request path."""
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        res = SERVED.get((group, version, rest[0] if rest else ""))
        if res is None or res.kind in self._unserved or len(rest) > 3 or (ns is not None and not res.namespaced):
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if sub not in ("", "status") or (sub == "status" and not res.status) or (name and res.namespaced and ns is None):
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        return res, ns if res.namespaced else "", name, sub

    def exec(self, handler: "_Handler", ns: str, name: str, raw_query: str) -> None:
        """pods/exec: the API server's checks (the Pod, its container, a node, not finished, an
        upgrade request), then the websocket session."""
        pod = self.storage.get(SERVED[("", "v1", "pods")], ns, name)
        query = parse_qs(raw_query)
        argv = query.get("command") or []
        names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = (query.get("container") or [names[0] if len(names) == 1 else ""])[-1]
        if not argv:
            raise ApiStatus(400, "BadRequest", "you must specify at least 1 command")
        if not container:
            raise ApiStatus(400, "BadRequest", f"a container name must be specified for pod {name}, "
                            f"choose one of: [{' '.join(map(str, names))}]")
        if container not in names:
            raise ApiStatus(400, "BadRequest", f"container {container} is not valid for pod {name}")
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            raise ApiStatus(400, "BadRequest",
                            f"cannot exec into a container in a completed pod; current phase is {phase}")
        if not (pod.get("spec") or {}).get("nodeName"):
            raise ApiStatus(400, "BadRequest", f"pod {name} does not have a host assigned")
        if (handler.headers.get("Upgrade") or "").lower() != "websocket" or not handler.headers.get("Sec-WebSocket-Key"):
            raise ApiStatus(400, "BadRequest", "Upgrade request required")
        protocol = choose_protocol(handler.headers.get("Sec-WebSocket-Protocol") or "")
        if protocol is None:
            raise ApiStatus(400, "BadRequest", "none of the offered subprotocols is supported (v5/v4.channel.k8s.io)")
        if self.exec_runner is None:
            raise ApiStatus(500, "InternalError", "TEST DOUBLE: the test gave no exec_runner to run commands in Pods")
        self.execs.append((ns, name, container, list(argv)))
        local = self.exec_runner(pod, container, list(argv))
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept_key(handler.headers["Sec-WebSocket-Key"]))
        handler.send_header("Sec-WebSocket-Protocol", protocol)
        handler.end_headers()
        handler.wfile.flush()
        handler.close_connection = True
        stdin = (query.get("stdin") or ["false"])[-1] in ("true", "1")
        ExecSession(handler.rfile, handler.wfile, protocol).run(local, list(argv), stdin)

    def list(self, res: Resource, ns: str | None, query: dict[str, str]) -> Obj:
        token = query.get("continue")
        if token:
            if token not in self._pages:
                raise ApiStatus(410, "Expired", "The provided continue parameter is too old")
            items, rv = self._pages.pop(token), token.split(":")[0]
        else:
            items, rv_int = self.storage.list(res, ns)
            rv = str(rv_int)
            items = [o for o in items if matches(o, query.get("labelSelector", ""), query.get("fieldSelector", ""))]
        meta: Obj = {"resourceVersion": rv}
        limit = int(query.get("limit") or 0)
        if 0 < limit < len(items):
            items, rest = items[:limit], items[limit:]
            meta["continue"] = f"{rv}:{secrets.token_hex(8)}"
            self._pages[meta["continue"]] = rest
        return {"apiVersion": res.api_version, "kind": res.kind + "List", "metadata": meta, "items": items}

    def watch(self, handler: "_Handler", res: Resource, ns: str | None, query: dict[str, str]) -> None:
        storage = self.storage
        since = query.get("resourceVersion") or ""
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        self._admit.wait()
        with storage.cond:
            drops = self._drops
            if since not in ("", "0") and int(since) < self._compacted:
                gone = ApiStatus(410, "Expired", f"too old resource version: {since} ({self._compacted + 1})")
                if self.gone_as_http:
                    raise gone
                handler.start_stream()
                handler.send_line({"type": "ERROR", "object": status_body(gone.code, gone.reason, gone.message)})
                handler.end_stream()
                return
            if since in ("", "0"):  # the current state first, as synthetic ADDED events
                items, position = storage.list(res, ns)
                pending = [("ADDED", o) for o in items]
            else:
                position, pending = int(since), []
        handler.start_stream()
        with storage.cond:
            self._open[res.plural] = self._open.get(res.plural, 0) + 1
        try:
            self._stream(handler, res, ns, pending, position, drops, deadline, bookmarks, labels, fields)
        finally:
            with storage.cond:
                self._open[res.plural] -= 1

    def _stream(self, handler: "_Handler", res: Resource, ns: str | None, pending: list[tuple[str, Obj]],
                position: int, drops: int, deadline: float, bookmarks: bool, labels: str, fields: str) -> None:
        storage = self.storage
        last_sent = time.monotonic()
        while True:
            for kind, obj in pending:
                if matches(obj, labels, fields):
                    handler.send_line({"type": kind, "object": obj})
                    last_sent = time.monotonic()
            with storage.cond:
                events = storage.events_since(res, ns, position)
                if not events:
                    wait = min(deadline, last_sent + self.bookmark_every) - time.monotonic()
                    if wait > 0 and not self._stopping and self._drops == drops:
                        storage.cond.wait(wait)
                    events = storage.events_since(res, ns, position)
                position = max([position] + [v for v, _, _ in events])
                if self._stopping or self._drops != drops:
                    handler.cut()  # mid-stream, no end of the chunked body: the client sees a broken stream
                    return
                current = storage.rv
            pending = [(t, o) for _, t, o in events]
            if time.monotonic() >= deadline:
                for kind, obj in pending:
                    handler.send_line({"type": kind, "object": obj})
                handler.end_stream()
                return
            if not pending and bookmarks and time.monotonic() - last_sent >= self.bookmark_every:
                position = current
                handler.send_line({"type": "BOOKMARK", "object": {"apiVersion": res.api_version, "kind": res.kind,
                                                                  "metadata": {"resourceVersion": str(current)}}})
                last_sent = time.monotonic()


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart (delayed ACKs)
    api: KubeApiDouble

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read `requests`
        pass

    def setup(self) -> None:
        super().setup()
        with self.api._lock:
            self.api._conns.add(self.connection)

    def finish(self) -> None:
        with self.api._lock:
            self.api._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # ---- answers
    def send_json(self, code: int, body: Obj) -> None:
        data = dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def send_line(self, event: Obj) -> None:
        data = dumps(event) + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def cut(self) -> None:
        self.close_connection = True
        _shut(self.connection)

    # ---- requests
    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.api.requests.append((method, url.path, query))
        self.api.agents.append(self.headers.get("User-Agent") or "")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            if self.headers.get("Authorization") != f"Bearer {self.api.token}":
                raise ApiStatus(401, "Unauthorized", "Unauthorized")
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise ApiStatus(400, "BadRequest", "the body is not JSON") from None
            self._serve(method, url.path, query, body)
        except ApiStatus as exc:
            self.send_json(exc.code, status_body(exc.code, exc.reason, exc.message))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _serve(self, method: str, path: str, query: dict[str, str], body: Any) -> None:
        api, storage = self.api, self.api.storage
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 7 and parts[4:7:2] == ["pods", "exec"]:
            if method not in ("GET", "POST"):  # a websocket exec is a GET; SPDY's a POST
                raise ApiStatus(405, "MethodNotAllowed", f"{method} is not allowed on {path}")
            api.exec(self, unquote(parts[3]), unquote(parts[5]), urlsplit(self.path).query)
            return
        res, ns, name, sub = api.resource(path)
        if method == "GET" and name is None and query.get("watch") in ("1", "true"):
            api.watch(self, res, ns, query)
        elif method == "GET" and name is None:
            self.send_json(200, api.list(res, ns, query))
        elif method == "GET":
            self.send_json(200, storage.get(res, ns, name))
        elif method == "POST" and name is None:
            self.send_json(201, storage.create(res, ns or "", body))
        elif method == "PUT" and name:
            self.send_json(200, storage.update(res, ns, name, body, sub))
        elif method == "PATCH" and name:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            self.send_json(200, storage.patch(res, ns, name, content_type, body, sub))
        elif method == "DELETE" and name and not sub:
            self.send_json(200, storage.delete(res, ns, name, body if isinstance(body, dict) else None))
        else:
            raise ApiStatus(405, "MethodNotAllowed", f"{method} is not allowed on {path}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

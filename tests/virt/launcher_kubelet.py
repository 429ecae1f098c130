"""The test plays the scheduler and the kubelet for launcher Pods on the Kubernetes API server
TEST DOUBLE (no cluster runs here), with real `pvlun launch` processes: a launcher Pod is bound
to a node (a migration target's to another), its container's args — parsed by pvlun's own
parser, as the container would — run as a local process with the Pod's paths mapped to a
directory of the Pod's own (the claim to the test's disk file, the token Secret's key to a
file, as the kubelet mounts it), and the Pod's status says what the process does: Running
with podIP 127.0.0.1, Ready once the migration port takes a connection (the startup probe), the
exit code when it ends. A Pod deleted from the API stops its process (SIGTERM, as the
kubelet). The double's pods/exec runs a command "in" a Pod as a local `pvlun` with the Pod's
run directory."""

from __future__ import annotations

import base64
import socket
import sys
import threading
import time
from pathlib import Path

from launch_process import ROOT, Launch, ticks
from pvlun.cli import build_parser
from virt.pod_migration import ACCEPTED, HEADER
from virt.pods import MIGRATION_JOB_LABEL, RUN_DIR, TOKEN_FILE, VMI_ANNOTATION


class StalledTarget:
    """A migration target that takes the stream (the header, ACCEPTED) and never reads it: a
    migration to it runs until it is cancelled."""

    def __init__(self, port: int):
        self.server = socket.create_server(("127.0.0.1", port))
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, name="stalled-target", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            line = b""
            while not line.endswith(b"\n") and (byte := conn.recv(1)):
                line += byte
            if line.startswith(HEADER):
                conn.sendall(ACCEPTED)

    @property
    def proc(self) -> "StalledTarget":
        return self  # never ends by itself

    def poll(self) -> int | None:
        return None

    def stdout(self) -> str:
        return ""

    def stderr(self) -> str:
        return ""

    def events(self) -> list[dict]:
        return []

    def stop(self) -> None:
        self.server.close()
        for conn in self.conns:
            conn.close()


class LauncherKubelet:
    def __init__(self, double, namespace: str, workdir: Path, disk: Path, *, source_node: str = "node-a",
                 target_node: str = "node-b"):
        self.double, self.ns, self.workdir, self.disk = double, namespace, workdir, disk
        self.nodes = (source_node, target_node)
        self.processes: dict[str, Launch | StalledTarget] = {}  # pod name → its launcher
        self.ports: dict[str, int] = {}  # target pod name → where it listens
        self.ready: set[str] = set()
        self.ended: set[str] = set()
        self.tokens: list[str] = []  # every token the kubelet mounted
        self.wrong_token: str | None = None  # mount this instead (a target that expects another)
        self.stall_targets = False  # run migration targets as StalledTarget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="launcher-kubelet", daemon=True)
        double.exec_runner = self.exec_runner

    # ---- the double's pods/exec
    def exec_runner(self, pod: dict, container: str, argv: list[str]) -> list[str] | None:
        if argv[0] != "pvlun" or container != "compute":
            return None
        run_dir = str(self.workdir / pod["metadata"]["name"] / "run")
        local = [run_dir if a == RUN_DIR else a for a in argv[1:]]
        return ["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "pvlun.cli", *local]

    # ---- the loop
    def start(self) -> "LauncherKubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for process in self.processes.values():
            process.stop()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a test helper: say it, keep playing
                print(f"launcher kubelet: {exc!r}", file=sys.stderr)

    def _pods(self) -> list[dict]:
        code, body = self.double.call("GET", f"/api/v1/namespaces/{self.ns}/pods")
        assert code == 200, body
        return body["items"]

    def _put_status(self, pod: dict, status: dict) -> dict | None:
        meta = pod["metadata"]
        code, body = self.double.call("PUT", f"/api/v1/namespaces/{self.ns}/pods/{meta['name']}/status",
                                      dict(pod, status=status))
        return body if code == 200 else None

    def step(self) -> None:
        pods = {p["metadata"]["name"]: p for p in self._pods()}
        for name in [n for n in self.processes if n not in pods]:
            self.processes[name].stop()  # deleted: the kubelet ends its containers
        for name, pod in pods.items():
            if name not in self.processes:
                self._run(pod)
            elif name not in self.ended:
                self._follow(pod)

    def _run(self, pod: dict) -> None:
        meta = pod["metadata"]
        target = MIGRATION_JOB_LABEL in (meta.get("labels") or {})
        node = self.nodes[1 if target else 0]
        code, pod = self.double.call("PATCH", f"/api/v1/namespaces/{self.ns}/pods/{meta['name']}",
                                     {"spec": {"nodeName": node}}, "application/merge-patch+json")
        assert code == 200, pod
        workdir = self.workdir / meta["name"]
        workdir.mkdir(parents=True)
        (workdir / "vmi.json").write_text(meta["annotations"][VMI_ANNOTATION])
        container = pod["spec"]["containers"][0]
        args = build_parser().parse_args(container["args"])
        volume = container["volumeDevices"][0]["devicePath"].rsplit("/", 1)[1]
        argv = ["launch", "--vmi-file", str(workdir / "vmi.json"), "--run-dir", str(workdir / "run"),
                "--disk-dir", str(workdir / "disks"), "--accel", "tcg", "--volume", f"{volume}={self.disk}"]
        if args.incoming:
            assert args.token_file == TOKEN_FILE
            secret = next(v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v)
            code, body = self.double.call("GET", f"/api/v1/namespaces/{self.ns}/secrets/{secret}")
            assert code == 200, body
            token = base64.b64decode(body["data"]["token"]).decode()
            self.tokens.append(token)
            (workdir / "token").write_text(self.wrong_token or token)
            argv += ["--incoming", str(args.incoming), "--listen-address", "127.0.0.1",
                     "--token-file", str(workdir / "token")]
            self.ports[meta["name"]] = args.incoming
        self.processes[meta["name"]] = StalledTarget(args.incoming) if args.incoming and self.stall_targets \
            else Launch(workdir, "launch", argv, env={"NODE_NAME": node})
        self._put_status(pod, self._running(ready=not args.incoming))
        if not args.incoming:
            self.ready.add(meta["name"])

    @staticmethod
    def _running(ready: bool) -> dict:
        return {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "hostIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                "containerStatuses": [{"name": "compute", "ready": ready, "started": True, "restartCount": 0,
                                       "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}

    def _follow(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        process = self.processes[name]
        code = process.proc.poll()
        if code is not None:
            self.ended.add(name)
            self._put_status(pod, {"phase": "Succeeded" if code == 0 else "Failed", "podIP": "127.0.0.1",
                                   "containerStatuses": [{"name": "compute", "ready": False, "restartCount": 0,
                                                          "state": {"terminated": {"exitCode": code}}}]})
        elif name not in self.ready and self._listens(self.ports[name]):
            self.ready.add(name)
            self._put_status(pod, self._running(ready=True))

    @staticmethod
    def _listens(port: int) -> bool:
        """The startup probe: a TCP connect, closed at once."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def events(self, pod: str) -> list[dict]:
        return self.processes[pod].events()

    def ticks(self, pod: str) -> list[int]:
        """The tick guest's count on the Pod's console."""
        return ticks(self.processes[pod].stdout())

    def wait_for_ticks(self, pod: str, at_least: int, timeout: float = 20.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ticks = self.ticks(pod)
            if len(ticks) >= at_least:
                return ticks
            time.sleep(0.05)
        raise AssertionError(f"{pod}: fewer than {at_least} ticks in {timeout} s: {self.processes[pod].stderr()}")

"""Servers that bench_import.py measures against, each a context manager that stops what it
started even on failure: a real `pvlun serve` (the apply-level rows share one daemon) and
Debian's docker-registry on loopback (TLS with a CA made here, htpasswd basic auth) holding
a containerDisk that skopeo pushed from an OCI layout built here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass

from host.command import run
from pvlun.local_run import start_daemon, stop_daemon

REGISTRY_USER, REGISTRY_PASSWORD = "bench", "bench-Pa55"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen) -> None:
    for _ in range(400):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- pvlun serve ------------------------------------------------------------------------------
class PvlunServe:
    """A `pvlun serve` on its own data dir (started and stopped by pvlun.local_run), and the
    CLI pointed at it."""

    def __init__(self, data_dir: str, pool_size: str = "32Gi"):
        self.data_dir = data_dir
        self.pool_size = pool_size
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> PvlunServe:
        os.makedirs(self.data_dir)
        self._proc = start_daemon(self.data_dir, pool_size=self.pool_size)  # stops the daemon itself if it fails
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            stop_daemon(self._proc, self.data_dir)

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """One `pvlun` command, as a user types it (the whole process is what gets timed)."""
        argv = [sys.executable, "-m", "pvlun.cli", *args, "--data-dir", self.data_dir]
        proc = subprocess.run(argv, input=input, text=True, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pvlun {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def apply(self, manifest: str) -> None:
        self.cli("apply", "-f", "-", "--wait", input=manifest)

    def free(self, dv_names: list[str], timeout: float = 120) -> None:
        """Delete these DataVolumes and wait until their claims (and so their volumes) are gone."""
        from controlplane.store import SQLiteStore

        for name in dv_names:
            self.cli("delete", "datavolume", name)
        store = SQLiteStore(os.path.join(self.data_dir, "catalog.db"))
        deadline = time.monotonic() + timeout
        while any(store.get("PersistentVolumeClaim", name, "default") for name in dv_names):
            if time.monotonic() > deadline:
                raise RuntimeError("deleted DataVolumes' claims are still there after 120 s")
            time.sleep(0.1)

    def lun_path(self, dv_name: str, namespace: str = "default") -> str:
        """The LUN file of the DataVolume's claim (the file backend: pool/volumes/<id>.img)."""
        from controlplane.store import SQLiteStore

        store = SQLiteStore(os.path.join(self.data_dir, "catalog.db"))
        pvc = store.get("PersistentVolumeClaim", dv_name, namespace)
        pv = store.get("PersistentVolume", pvc["spec"]["volumeName"])
        return os.path.join(self.data_dir, "pool", "volumes", pv["spec"]["csi"]["volumeHandle"] + ".img")


# -- TLS --------------------------------------------------------------------------------------
@dataclass
class Pki:
    ca_pem: str
    cert_file: str
    key_file: str
    cert_dir: str   # holds ca.crt, for skopeo --dest-cert-dir


def make_pki(d: str) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pvlun bench CA")])

    def builder(subject, public_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=1)))

    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    os.makedirs(os.path.join(d, "certs"))
    paths = {"certs/ca.crt": ca_pem, "server.crt": cert.public_bytes(serialization.Encoding.PEM).decode(),
             "server.key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode()}
    for name, text in paths.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return Pki(ca_pem, os.path.join(d, "server.crt"), os.path.join(d, "server.key"), os.path.join(d, "certs"))


# -- containerDisk ------------------------------------------------------------------------------
class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)


def write_container_disk(root: str, disk: str, tag: str) -> None:
    """An OCI image layout with one uncompressed layer holding disk/disk.qcow2 (a containerDisk).
    The tar is streamed to its blob file, never held in memory."""
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs)

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    partial = os.path.join(blobs, "layer.partial")
    with open(partial, "wb") as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            info = tarfile.TarInfo("disk")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            tar.add(disk, arcname="disk/disk.qcow2")
    layer_digest = writer.sha.hexdigest()
    os.rename(partial, os.path.join(blobs, layer_digest))
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + layer_digest,
             "size": os.path.getsize(os.path.join(blobs, layer_digest))}
    config = put(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())
    manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                               "layers": [layer]}).encode())
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                      **manifest, "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)


# -- docker-registry --------------------------------------------------------------------------------
class Registry:
    """Debian's docker-registry on 127.0.0.1 over TLS with one htpasswd user."""

    def __init__(self, work: str):
        self.work = work
        os.makedirs(work)
        self.pki = make_pki(work)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # bcrypt, the only hash docker-registry's htpasswd accepts

            hashed = crypt.crypt(REGISTRY_PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        with open(os.path.join(work, "htpasswd"), "w") as f:
            f.write(f"{REGISTRY_USER}:{hashed}\n")
        port = free_port()
        self.host = f"127.0.0.1:{port}"
        with open(os.path.join(work, "config.yml"), "w") as f:
            f.write(f"""version: 0.1
log: {{level: error}}
storage: {{filesystem: {{rootdirectory: {work}/data}}}}
http: {{addr: "{self.host}", tls: {{certificate: {self.pki.cert_file}, key: {self.pki.key_file}}}}}
auth: {{htpasswd: {{realm: pvlun-bench, path: {work}/htpasswd}}}}
""")
        self._proc = subprocess.Popen(["docker-registry", "serve", os.path.join(work, "config.yml")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, self._proc)
        except BaseException:
            stop(self._proc)
            raise

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        stop(self._proc)

    def push_container_disk(self, disk: str, repo: str, tag: str = "latest") -> str:
        """Build the containerDisk of `disk` and push it with skopeo; returns its docker:// URL."""
        layout = os.path.join(self.work, "layout")
        write_container_disk(layout, disk, tag)
        url = f"docker://{self.host}/{repo}:{tag}"
        run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-cert-dir", self.pki.cert_dir,
             "--dest-creds", f"{REGISTRY_USER}:{REGISTRY_PASSWORD}", f"oci:{layout}:{tag}", url], timeout=600)
        return url

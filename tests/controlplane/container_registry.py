"""A real registry for containerDisk tests: Debian's docker-registry on loopback over TLS (a CA
made here, bench/import_fixtures.make_pki) with one htpasswd user; images built here as OCI
layouts (tests/importer/registry_support.py: files, symbolic links, hand-made tars) and pushed
with skopeo. The registry logs every request, so a test can count the blobs it served."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from bench.import_fixtures import free_port, make_pki, stop, wait_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "importer"))
from registry_support import build_oci_layout  # noqa: E402

USER, PASSWORD = "puller", "cd-Pa55"


class Registry:
    """docker-registry on 127.0.0.1 (TLS, htpasswd); `host` is its HOST:PORT."""

    def __init__(self, work: Path):
        self.work = work
        self.pki = make_pki(str(work / "pki"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # bcrypt, the only hash docker-registry's htpasswd takes

            hashed = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        (work / "htpasswd").write_text(f"{USER}:{hashed}\n")
        port = free_port()
        self.host = f"127.0.0.1:{port}"
        (work / "config.yml").write_text(f"""version: 0.1
log: {{level: info, formatter: text, accesslog: {{disabled: true}}}}
storage: {{filesystem: {{rootdirectory: {work}/data}}, delete: {{enabled: true}}}}
http: {{addr: "{self.host}", tls: {{certificate: {self.pki.cert_file}, key: {self.pki.key_file}}}}}
auth: {{htpasswd: {{realm: pvlun-test, path: {work}/htpasswd}}}}
""")
        self.log = work / "registry.log"
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")],
                                          stdout=subprocess.DEVNULL, stderr=log)
        wait_port(port, self._proc)

    def push(self, ref: str, layers: list[dict | bytes]) -> str:
        """Push an image of `layers` (bottom first; each a dict of files, registry_support's
        _tar_bytes, or a tar made by hand) as REPO:TAG; returns its reference as a VM names it."""
        layout = self.work / ("layout-" + re.sub(r"[^a-z0-9]", "-", ref))
        build_oci_layout(layout, "t", [(layer, "gzip") for layer in layers])
        subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-cert-dir", self.pki.cert_dir,
                        "--dest-creds", f"{USER}:{PASSWORD}", f"oci:{layout}:t", f"docker://{self.host}/{ref}"],
                       check=True, capture_output=True, timeout=120)
        return f"{self.host}/{ref}"

    def blob_gets(self, repo: str) -> int:
        """Blob downloads of `repo` the registry has served so far (skopeo's pushes are HEADs/PUTs)."""
        pattern = re.compile(rf'http\.request\.method=GET .*http\.request\.uri="?/v2/{re.escape(repo)}/blobs/sha256:')
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if "response completed" in line and pattern.search(line))

    def stop(self) -> None:
        stop(self._proc)


def docker_config_secret(name: str, host: str, user: str = USER, password: str = PASSWORD) -> str:
    """A kubernetes.io/dockerconfigjson Secret manifest, as `kubectl create secret docker-registry` makes it."""
    import base64

    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = json.dumps({"auths": {host: {"username": user, "password": password, "auth": auth}}})
    return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\ntype: kubernetes.io/dockerconfigjson\n"
            f"data:\n  .dockerconfigjson: {base64.b64encode(config.encode()).decode()}\n")


def install_ca(data_dir: str, registry: Registry) -> None:
    """Trust the registry's CA on the node as containerd would: DATA_DIR/certs.d/HOST:PORT/ca.crt."""
    d = os.path.join(data_dir, "certs.d", registry.host)
    os.makedirs(d, exist_ok=True)
    Path(d, "ca.crt").write_text(registry.pki.ca_pem)

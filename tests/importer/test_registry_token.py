"""Registry token auth for real: Debian's docker-registry with `auth: token:` trusting a token
server on loopback (registry_support.TokenServer). skopeo pushes through the token dance
itself; the importer then pulls with the secretRef's credentials exchanged for a Bearer
token, and fails as Unauthorized with wrong or missing credentials."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass

import pytest

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, assert_disk, assert_zero, block_target, run_import, stop
from registry_support import TokenServer, build_oci_layout, serve_registry

USER, PASSWORD = "tokenuser", "tok-Pa55w0rd"
CREDS = {"reg": {"accessKeyId": USER, "secretKey": PASSWORD}}
SERVICE, ISSUER = "pvlun-test-registry", "pvlun-test-token-issuer"


@dataclass
class TokenRegistry:
    host: str
    tokens: TokenServer


@pytest.fixture(scope="module")
def token_registry(images, pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("token-registry")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki.cert_file, pki.key_file)
    tokens = TokenServer(tls, {USER: PASSWORD}, service=SERVICE, issuer=ISSUER, workdir=d)
    auth = f"""auth:
  token:
    realm: {tokens.realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {tokens.cert_bundle}
"""
    try:
        proc, host = serve_registry(d, pki, auth, log=d / "registry.log")
    except BaseException:
        tokens.stop()
        raise
    try:
        pushes = {
            "vm/qcow2:v1": [({"disk/disk.img": images.path("qcow2").read_bytes()}, "gzip")],
            "vm/raw:v1": [({"disk/disk.raw": images.path("raw").read_bytes()}, "zstd"), ({"etc/motd": b"hi\n"}, "gzip")],
        }
        for ref, layers in pushes.items():
            layout = d / ref.replace("/", "_").replace(":", "_")
            build_oci_layout(layout, "v1", layers)
            push = subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-cert-dir", pki.cert_dir,
                                   "--dest-creds", f"{USER}:{PASSWORD}", f"oci:{layout}:v1", f"docker://{host}/{ref}"],
                                  capture_output=True, text=True, timeout=60)
            assert push.returncode == 0, push.stderr + (d / "registry.log").read_text()[-2000:]
        # skopeo got its push tokens from our server, as the registry sent it there
        assert any(r.authenticated and "push" in a["actions"] for r in tokens.seen for a in r.granted)
        yield TokenRegistry(host, tokens)
    finally:
        stop(proc)
        tokens.stop()


def _source(host: str, ref: str, secret: bool = True) -> dict:
    spec = {"url": f"docker://{host}/{ref}", "certConfigMap": "ca"}
    if secret:
        spec["secretRef"] = "reg"
    return {"registry": spec}


@pytest.mark.parametrize("ref,kind", [("vm/qcow2:v1", "qcow2"), ("vm/raw:v1", "raw")])
def test_token_auth_import_lands_byte_exact(ref, kind, token_registry, images, pki, tmp_path, scratch):
    mark = token_registry.tokens.mark()
    lun = block_target(tmp_path)
    result, progress = run_import(_source(token_registry.host, ref), Target(str(lun), 16 * MiB), scratch,
                                  secrets=CREDS, configmaps={"ca": {"ca.pem": pki.ca_pem}})
    assert result.format == kind
    assert_disk(lun, images.expected[kind], 16 * MiB)   # expected = `qemu-img convert -O raw` of the source
    assert progress[-1] == 100.0
    seen = token_registry.tokens.requests_since(mark)
    repo = ref.split(":")[0]
    # one token, fetched with the secret's credentials, for pull on this repository only
    assert [(r.account, r.authenticated, r.service, r.scopes) for r in seen] == [
        (USER, True, SERVICE, [f"repository:{repo}:pull"])]
    assert seen[0].granted == [{"type": "repository", "name": repo, "actions": ["pull"]}]


@pytest.mark.parametrize("secrets,account", [
    ({"reg": {"accessKeyId": USER, "secretKey": "wrong-Pa55"}}, USER),   # the token server refuses: 401
    (None, None),                                                        # anonymous token without access: 401
])
def test_token_auth_refused_is_unauthorized(secrets, account, token_registry, pki, tmp_path, scratch):
    mark = token_registry.tokens.mark()
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as info:
        run_import(_source(token_registry.host, "vm/qcow2:v1", secret=secrets is not None), Target(str(lun), 16 * MiB),
                   scratch, secrets=secrets, configmaps={"ca": {"ca.pem": pki.ca_pem}})
    assert info.value.reason == errors.UNAUTHORIZED, info.value
    assert "Pa55" not in str(info.value)
    seen = token_registry.tokens.requests_since(mark)
    assert [(r.account, r.authenticated, r.scopes, r.granted) for r in seen] == [
        (account, False, ["repository:vm/qcow2:pull"], [])]
    assert_zero(lun)


@pytest.mark.parametrize("realm", ["html", "empty"])
def test_token_service_without_a_token_is_unauthorized(realm, token_registry, pki, tmp_path, scratch):
    """A realm answering HTML or JSON without a token fails as Unauthorized, not with a traceback."""
    lun = block_target(tmp_path)
    host = f"127.0.0.1:{token_registry.tokens.server_address[1]}"
    with pytest.raises(ImportFailed) as info:
        run_import(_source(host, f"{realm}/disk:v1"), Target(str(lun), 16 * MiB), scratch, secrets=CREDS,
                   configmaps={"ca": {"ca.pem": pki.ca_pem}})
    assert info.value.reason == errors.UNAUTHORIZED, info.value
    assert "no token" in info.value.message
    assert_zero(lun)

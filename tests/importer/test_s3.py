"""The s3 source against moto's S3 server on loopback (PyPI `moto[server]`: a real S3 API
that checks SigV4 signatures against IAM keys once its first unauthenticated calls are used)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from importer import errors
from importer.errors import ImportFailed
from importer.pipeline import Target

from importer_support import MiB, assert_disk, assert_zero, block_target, free_port, run_import, stop, wait_port


@pytest.fixture(scope="module")
def s3(images, tmp_path_factory):
    import boto3  # comes with moto[server], a dev dependency
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # 3 IAM calls, then SigV4 is enforced
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, timeout=60)
    endpoint = f"http://127.0.0.1:{port}"
    anon = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "y"}
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="importer")
    iam.put_user_policy(UserName="importer", PolicyName="all", PolicyDocument='{"Version": "2012-10-17", "Statement": '
                        '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}')
    key = iam.create_access_key(UserName="importer")["AccessKey"]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    client.create_bucket(Bucket="disks")
    for kind in ("qcow2", "raw.xz", "vhdx"):
        client.upload_file(str(images.path(kind)), "disks", f"images/{kind}.bin")
    yield {"endpoint": endpoint, "secret": {"accessKeyId": key["AccessKeyId"], "secretKey": key["SecretAccessKey"]}}
    stop(proc)


@pytest.mark.parametrize("kind", ["qcow2", "raw.xz", "vhdx"])
def test_s3_object_lands_byte_exact(kind, s3, images, tmp_path, scratch):
    lun = block_target(tmp_path)
    digest = hashlib.sha256(images.path(kind).read_bytes()).hexdigest()
    result, _ = run_import({"s3": {"url": f"{s3['endpoint']}/disks/images/{kind}.bin", "secretRef": "s3",
                                   "checksum": f"sha256:{digest}"}},
                           Target(str(lun), 16 * MiB), scratch, secrets={"s3": s3["secret"]})
    assert result.format == kind.split(".")[0]
    assert_disk(lun, images.expected[kind], 16 * MiB)


@pytest.mark.parametrize("key,secret_key,reason", [
    ("images/nope.bin", None, errors.NOT_FOUND),
    ("images/qcow2.bin", "wrong-S3cret", errors.UNAUTHORIZED),
])
def test_s3_failures(key, secret_key, reason, s3, tmp_path, scratch):
    secret = dict(s3["secret"])
    if secret_key:
        secret["secretKey"] = secret_key
    lun = block_target(tmp_path)
    with pytest.raises(ImportFailed) as info:
        run_import({"s3": {"url": f"{s3['endpoint']}/disks/{key}", "secretRef": "s3"}}, Target(str(lun), 16 * MiB),
                   scratch, secrets={"s3": secret})
    assert info.value.reason == reason, info.value
    assert secret["secretKey"] not in str(info.value)
    assert_zero(lun)

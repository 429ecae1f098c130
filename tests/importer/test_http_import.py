"""Every format, from nginx (range requests: qemu reads in place) and from Python's
http.server (no ranges: streamed or via scratch), byte-exact against `qemu-img convert`."""

from __future__ import annotations

import os

import pytest

from importer.errors import ImportFailed
from importer.pipeline import Target, usable_space

from importer_support import MiB, allocated, assert_disk, block_target, published, run_import

IMAGE_KINDS = ["qcow2", "vmdk", "vdi", "vhd", "vhdx"]
STREAM_KINDS = ["raw", "iso", "raw.gz", "raw.xz", "raw.zst", "raw.tar", "raw.tar.gz"]
SCRATCH_KINDS = ["qcow2.gz", "qcow2.xz", "qcow2.zst", "qcow2.tar", "qcow2.tar.gz", "vmdk.xz", "vhdx.xz"]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_from_range_server_converts_in_place_without_scratch(kind, nginx, images, tmp_path, scratch):
    """In place, except VMDK: its metadata names files at every open, so it is converted from a
    local copy nobody can change (and that is faster than its unaligned reads in place)."""
    lun = block_target(tmp_path)
    result, progress = run_import({"http": {"url": f"{nginx.url}/img/{kind}.bin"}}, Target(str(lun), 16 * MiB), scratch)
    assert result.format == kind and os.listdir(scratch) == []
    if kind == "vmdk":
        assert result.method == "scratch" and result.bytes_transferred == os.path.getsize(images.path(kind))
    else:
        assert result.method == "direct" and result.bytes_transferred == 0
    assert_disk(lun, images.expected[kind], 16 * MiB)
    assert progress[-1] == 100.0 and progress == sorted(progress)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_from_server_without_ranges_goes_through_scratch(kind, py_http, images, tmp_path, scratch):
    lun = block_target(tmp_path)
    result, progress = run_import({"http": {"url": f"{py_http.url}/img/{kind}.bin"}}, Target(str(lun), 16 * MiB), scratch)
    assert result.method == "scratch" and result.format == kind
    assert_disk(lun, images.expected[kind], 16 * MiB)
    assert os.listdir(scratch) == [], "scratch space is cleaned up"
    assert progress[-1] == 100.0 and progress == sorted(progress)


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize("server", ["nginx", "py_http"])
def test_raw_and_compressed_raw_stream_into_the_volume_skipping_zero_blocks(kind, server, request, images, tmp_path, scratch):
    url = request.getfixturevalue(server).url
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"{url}/img/{kind}.bin"}}, Target(str(lun), 16 * MiB), scratch)
    assert result.method == "stream"
    assert result.format == ("iso" if kind == "iso" else "raw")
    assert_disk(lun, images.expected[kind], 16 * MiB)
    if kind != "iso":  # the base image holds ~1.7 MiB of data in 6 MiB; zero blocks are never written
        assert allocated(lun) <= allocated(images.expected["raw"]) + 4 * 64 * 1024


@pytest.mark.parametrize("kind", SCRATCH_KINDS)
def test_compressed_or_archived_images_are_unpacked_then_converted(kind, nginx, images, tmp_path, scratch):
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/{kind}.bin"}}, Target(str(lun), 16 * MiB), scratch)
    assert result.method == "scratch"
    assert result.layers and result.format == kind.split(".")[0]
    assert_disk(lun, images.expected[kind], 16 * MiB)


@pytest.mark.parametrize("kind", ["qcow2", "raw.gz"])
def test_filesystem_volume_gets_disk_img_of_the_usable_space(kind, nginx, images, tmp_path, scratch):
    vol = tmp_path / "mnt"
    vol.mkdir()
    target = Target(str(vol), 20 * MiB, mode="Filesystem")
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/{kind}.bin"}}, target, scratch)
    usable = usable_space(target)
    assert usable == int(20 * MiB * 0.945) // MiB * MiB  # CDI's 5.5% overhead, 1 MiB aligned
    assert result.disk_path == str(vol / "disk.img") and result.disk_size == usable
    assert_disk(vol / "disk.img", images.expected[kind], usable)


def test_preallocation_allocates_the_whole_disk(nginx, images, tmp_path, scratch):
    vol = tmp_path / "mnt"
    vol.mkdir()
    target = Target(str(vol), 20 * MiB, mode="Filesystem", preallocation=True)
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/qcow2.bin"}}, target, scratch)
    assert allocated(vol / "disk.img") >= result.disk_size
    assert_disk(vol / "disk.img", images.expected["qcow2"], result.disk_size)


def test_archive_content_type_unpacks_the_tar_into_the_volume(py_http, images, tmp_path, scratch):
    vol = tmp_path / "mnt"
    vol.mkdir()
    target = Target(str(vol), 64 * MiB, mode="Filesystem", content_type="archive")
    result, _ = run_import({"http": {"url": f"{py_http.url}/img/qcow2.tar.gz.bin"}}, target, scratch)
    assert result.method == "archive"
    assert sorted(os.listdir(vol)) == ["qcow2.img"]
    assert (vol / "qcow2.img").read_bytes() == images.path("qcow2").read_bytes()


@pytest.mark.parametrize("server", ["nginx", "py_https"])
def test_https_with_ca_from_cert_configmap(server, request, nginx, pki, images, tmp_path, scratch):
    base = nginx.https_url if server == "nginx" else request.getfixturevalue(server).url
    for kind in ("qcow2", "raw.zst"):
        lun = block_target(tmp_path, name=f"{kind}.lun")
        result, _ = run_import({"http": {"url": f"{base}/img/{kind}.bin", "certConfigMap": "ca"}},
                               Target(str(lun), 16 * MiB), scratch, configmaps={"ca": {"ca.pem": pki.ca_pem}})
        # nbdkit's curl plugin gets the CA bundle (cainfo=): images still convert in place
        assert result.method == ("stream" if kind == "raw.zst" else "direct" if server == "nginx" else "scratch")
        assert_disk(lun, images.expected[kind], 16 * MiB)


def test_cert_configmap_with_any_key_name(py_https, pki, images, tmp_path, scratch):
    lun = block_target(tmp_path)
    run_import({"http": {"url": f"{py_https.url}/img/raw.bin", "certConfigMap": "ca"}}, Target(str(lun), 16 * MiB),
               scratch, configmaps={"ca": {"tls-ca-bundle.crt": pki.ca_pem}})
    assert_disk(lun, images.expected["raw"])


@pytest.mark.parametrize("server", ["nginx", "py_http"])
def test_basic_auth_from_secret_ref(server, request, images, tmp_path, scratch):
    url = request.getfixturevalue(server).url
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"{url}/auth/qcow2.bin", "secretRef": "creds"}}, Target(str(lun), 16 * MiB),
                           scratch, secrets={"creds": {"accessKeyId": "user", "secretKey": "s3cret-pass"}})
    # nginx: nbdkit's curl plugin reads the password from a 0600 file (password=+FILE), not argv
    assert result.method == ("direct" if server == "nginx" else "scratch")
    assert_disk(lun, images.expected["qcow2"])


def test_a_secret_ref_with_both_keys_empty_means_no_credentials(py_http, images, tmp_path, scratch):
    """CDI's endpoint-secret example leaves accessKeyId and secretKey empty: no credentials are sent
    (an /auth/ path would answer 401), the import of a public path goes on."""
    lun = block_target(tmp_path)
    run_import({"http": {"url": f"{py_http.url}/img/raw.bin", "secretRef": "endpoint-secret"}},
               Target(str(lun), 16 * MiB), scratch, secrets={"endpoint-secret": {"accessKeyId": "", "secretKey": ""}})
    assert_disk(lun, images.expected["raw"])
    with pytest.raises(ImportFailed, match="needs the keys accessKeyId and secretKey"):
        run_import({"http": {"url": f"{py_http.url}/img/raw.bin", "secretRef": "half"}},
                   Target(str(block_target(tmp_path, name="half.img")), 16 * MiB), scratch,
                   secrets={"half": {"accessKeyId": "user", "secretKey": None}})


def test_extra_headers_and_secret_extra_headers_are_sent(py_http, images, tmp_path, scratch):
    lun = block_target(tmp_path)
    run_import({"http": {"url": f"{py_http.url}/hdr/raw.xz.bin", "extraHeaders": ["X-Other: yes"],
                         "secretExtraHeaders": ["hdrs"]}},
               Target(str(lun), 16 * MiB), scratch, secrets={"hdrs": {"apikey": "X-Api-Key: k3y-value"}})
    assert_disk(lun, images.expected["raw.xz"])


def test_bounded_redirects_are_followed(py_http, images, tmp_path, scratch):
    lun = block_target(tmp_path)
    run_import({"http": {"url": f"{py_http.url}/redirect/3/qcow2.bin"}}, Target(str(lun), 16 * MiB), scratch)
    assert_disk(lun, images.expected["qcow2"])


@pytest.mark.parametrize("kind", ["raw.gz", "qcow2"])
def test_matching_checksum_is_accepted(kind, nginx, images, tmp_path, scratch):
    import hashlib

    digest = hashlib.sha256(images.path(kind).read_bytes()).hexdigest()
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"{nginx.url}/img/{kind}.bin", "checksum": f"sha256:{digest}"}},
                           Target(str(lun), 16 * MiB), scratch)
    assert result.method != "direct", "a checksum is verified before qemu touches the image"
    assert_disk(lun, images.expected[kind])


def test_file_url_when_the_embedded_flag_allows_it(images, public, tmp_path, scratch):
    lun = block_target(tmp_path)
    result, _ = run_import({"http": {"url": f"file://{published(public, images.path('vdi'))}"}}, Target(str(lun), 16 * MiB), scratch,
                           allow_file=True)
    assert result.method == "direct"
    assert_disk(lun, images.expected["vdi"])


def test_blank_source_leaves_an_empty_disk(tmp_path, scratch):
    vol = tmp_path / "mnt"
    vol.mkdir()
    result, progress = run_import({"blank": {}}, Target(str(vol), 10 * MiB, mode="Filesystem"), scratch)
    assert os.path.getsize(vol / "disk.img") == result.disk_size > 0
    assert allocated(vol / "disk.img") == 0 and progress[-1] == 100.0


def test_progress_feeds_the_prometheus_gauge(nginx, tmp_path, scratch):
    from prometheus_client import REGISTRY

    from importer import metrics
    from importer.pipeline import import_into
    from importer.sources import from_spec

    lun = block_target(tmp_path)
    src = from_spec({"http": {"url": f"{nginx.url}/img/raw.gz.bin"}}, secret=dict, configmap=dict)
    import_into(src, Target(str(lun), 16 * MiB), progress=metrics.reporter("ns1", "dv1"), scratch_dir=scratch)
    assert REGISTRY.get_sample_value("pvlun_import_progress", {"namespace": "ns1", "name": "dv1"}) == 100.0
    metrics.clear("ns1", "dv1")
    assert REGISTRY.get_sample_value("pvlun_import_progress", {"namespace": "ns1", "name": "dv1"}) is None

"""`pvlun apply` of hostile manifests, each built here: one line of error naming the document
or field, exit 1, within bounded time and memory, and nothing written to the store. Names
follow Kubernetes' limits at admission, and the longest admitted ones import fine."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

MEMORY_LIMIT = 512 << 20  # address space of the CLI: a bomb expanded would need far more
TIME_LIMIT = 20  # seconds


def billion_laughs() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    return "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: lol}\ndata:\n" + "".join(
        "  " + line + "\n" for line in text.splitlines())


def pvc(spec: str, name: str = "claim") -> str:
    return f"apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def dv(storage: str = "{resources: {requests: {storage: 1Mi}}}", name: str = "disk", extra: str = "") -> str:
    return (f"apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata: {{name: {name}{extra}}}\n"
            f"spec: {{source: {{blank: {{}}}}, storage: {storage}}}\n")


def source_dv(source: str, name: str = "src") -> str:
    return (f"apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata: {{name: {name}}}\n"
            f"spec: {{source: {{{source}}}, storage: {{resources: {{requests: {{storage: 1Mi}}}}}}}}\n")


def vm(name: str, template_storage: str = "{resources: {requests: {storage: 1Mi}}}") -> str:
    return f"""apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  runStrategy: Halted
  dataVolumeTemplates:
  - metadata: {{name: {name[:50]}-root}}
    spec: {{source: {{blank: {{}}}}, storage: {template_storage}}}
  template:
    spec:
      domain: {{resources: {{requests: {{memory: 64Mi}}}}}}
      volumes: [{{name: root, dataVolume: {{name: {name[:50]}-root}}}}]
"""


# (case, manifest text or bytes, a fragment the one line must hold)
CASES = [
    ("alias bomb", billion_laughs(), "alias bomb"),
    ("self-referencing anchor", "apiVersion: v1\nkind: ConfigMap\nmetadata: &m {name: loop, labels: *m}\n",
     "refers to its own anchor"),
    ("List containing itself", "&l {apiVersion: v1, kind: List, items: [*l]}\n", "refers to its own anchor"),
    ("deep flow nesting", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: deep}\ndata: " + "[" * 100_000
     + "]" * 100_000 + "\n", "nest"),
    ("deep block nesting", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: deep}\ndata:\n"
     + "".join(" " * i + f"k{i}:\n" for i in range(1, 300)), "nested deeper than 64"),
    ("huge document", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: big}\ndata: {a: '" + "x" * (9 << 20) + "'}\n",
     "larger than 8 MiB"),
    ("object past etcd's limit", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: big}\ndata: {a: '"
     + "x" * (2 << 20) + "'}\n", "at most 1572864 bytes"),
    ("many values", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: many}\nx: [" + "[]," * 300_000 + "]\n",
     "more than 250,000 values"),
    ("items: 5", "apiVersion: v1\nkind: List\nitems: 5\n", "items of a List must be a list"),
    ("List item not an object", "apiVersion: v1\nkind: List\nitems: [5]\n", "item 1: not a Kubernetes object"),
    ("accessModes: ReadWriteOnce", pvc("{accessModes: ReadWriteOnce, resources: {requests: {storage: 1Gi}}}"),
     "spec.accessModes: must be a list"),
    ("DataVolume accessModes: ReadWriteOnce",
     dv("{accessModes: ReadWriteOnce, resources: {requests: {storage: 1Mi}}}"), "spec.storage.accessModes"),
    ("spec: []", "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata: {name: d}\nspec: []\n",
     "spec: must be an object"),
    ('metadata: "x"', 'apiVersion: v1\nkind: ConfigMap\nmetadata: "x"\n', "metadata: must be an object"),
    ("storage: [1]", pvc("{resources: {requests: {storage: [1]}}}"), "spec.resources.requests.storage"),
    ("dataSource without a name", pvc("{dataSource: {kind: PersistentVolumeClaim}}"), "spec.dataSource.name is required"),
    ("kind: [1]", "kind: [1]\nmetadata: {name: a}\n", "no kind"),
    ("labels of lists", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, labels: {x: [1]}}\n",
     "metadata.labels.x: must be a string"),
    ("Secret data not base64", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {key: '%%%'}\n",
     "data.key: is not valid base64"),
    ("StorageClass parameters of lists", "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: c}\n"
     "provisioner: csi.pvlun.dev\nparameters: {fsType: [ext4]}\n", "parameters.fsType: must be a string"),
    ("http source a string", "apiVersion: cdi.kubevirt.io/v1beta1\nkind: DataVolume\nmetadata: {name: d}\n"
     "spec: {source: {http: 'x'}, storage: {resources: {requests: {storage: 1Mi}}}}\n", "spec.source.http"),
    ("VM template DataVolume of wrong type", vm("typed", "{accessModes: ReadWriteOnce}"),
     "spec.dataVolumeTemplates[0].spec.storage.accessModes"),
    ("a list document", "- a\n- b\n", "document 1: not a Kubernetes object (a list"),
    ("a scalar document", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\n---\n42\n", "document 2"),
    ("duplicate key", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nmetadata: {name: b}\n", "given twice"),
    ("python tag", "apiVersion: v1\nkind: ConfigMap\nmetadata: !!python/object/apply:os.system [id]\n",
     "could not determine a constructor"),
    ("binary garbage", None, "not UTF-8"),
    ("control characters", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: \x01}\n", "control characters"),
    ("name of 254 characters", dv(name="a" * 254), "254 characters long; at most 253"),
    ("namespace of 64 characters", dv(extra=", namespace: " + "n" * 64), "metadata.namespace is 64 characters"),
    ("VirtualMachine name of 64 characters", vm("v" * 64), "64 characters long; at most 63"),
    ("name with capitals", dv(name="Disk_1"), "is not a valid name"),
    ("pvc source without a name", source_dv("pvc: {}"), "spec.source.pvc.name is required"),
    ("snapshot source with an empty name", source_dv("snapshot: {name: ''}"), "spec.source.snapshot.name is required"),
    ("http source without a url", source_dv("http: {}"), "spec.source.http.url is required"),
    ("registry source without a url", source_dv("registry: {secretRef: s}"), "spec.source.registry.url is required"),
    ("DataVolume cloning itself", source_dv("pvc: {name: self}", name="self"), "cannot be cloned from itself"),
    ("VM template cloning itself", vm("selfish").replace("blank: {}", "pvc: {name: selfish-root}"),
     "spec.dataVolumeTemplates[0].spec.source.pvc.name: a DataVolume cannot be cloned from itself"),
    ("claim cloning itself", pvc("{dataSource: {kind: PersistentVolumeClaim, name: claim}}"),
     "spec.dataSource.name: a claim cannot be cloned from itself"),
    ("claims naming each other", pvc("{dataSource: {kind: PersistentVolumeClaim, name: b}}", name="a") + "---\n"
     + pvc("{dataSource: {kind: PersistentVolumeClaim, name: a}}", name="b"),
     "(claim default/a → claim default/b → claim default/a)"),
    ("claim of size 0", pvc("{resources: {requests: {storage: '0'}}}"),
     "spec.resources.requests.storage: must be greater than zero"),
    ("DataVolume of size 0", dv("{resources: {requests: {storage: 0Gi}}}"),
     "spec.storage.resources.requests.storage: must be greater than zero"),
    ("5,000-digit integer", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\n---\n"
     "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: big}\nx: " + "7" * 5000 + "\n",
     "document 2: line 8, column 4: a number of 5,000 characters"),
]


def run_apply(inst, path: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(["prlimit", f"--as={MEMORY_LIMIT}", "--", sys.executable, "-m", "pvlun.cli", "apply",
                           "-f", path, "--data-dir", inst.data_dir], capture_output=True, text=True,
                          timeout=TIME_LIMIT * 3)
    return proc, time.monotonic() - started


def assert_one_line_refusal(proc: subprocess.CompletedProcess, elapsed: float, fragment: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-500:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(lines[0]) < 500
    assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    assert elapsed < TIME_LIMIT


@pytest.mark.parametrize("case,manifest,fragment", CASES, ids=[c[0] for c in CASES])
def test_hostile_manifest_is_one_line_exit_1_and_stores_nothing(instance, tmp_path, case, manifest, fragment):
    path = tmp_path / "manifest.yaml"
    data = os.urandom(4096) if manifest is None else manifest.encode()
    if manifest is None:  # garbage that is certainly not UTF-8
        data = b"\xff\xfe\xfa" + data
    path.write_bytes(data)
    before = instance.store.version()
    proc, elapsed = run_apply(instance, str(path))
    assert_one_line_refusal(proc, elapsed, fragment)
    assert instance.store.version() == before  # nothing was stored, not even the good documents before it


def test_missing_and_unreadable_manifests_are_one_line(instance, tmp_path):
    for path, fragment in ((str(tmp_path / "absent.yaml"), "No such file"), (str(tmp_path), "Is a directory")):
        proc, elapsed = run_apply(instance, path)
        assert_one_line_refusal(proc, elapsed, "cannot read")
        assert fragment in proc.stderr


def test_longest_admitted_names_import_without_file_name_too_long(instance):
    namespace, name = "n" * 63, ("d" * 63 + ".") * 3 + "d" * 61  # a 63-char label and a 253-char subdomain
    assert len(name) == 253
    out = instance.apply(dv(name=name, extra=f", namespace: {namespace}"), "--wait", "--timeout", "120")
    assert "Succeeded" in out.stdout, out.stderr
    assert instance.get("DataVolume", name, namespace)["status"]["phase"] == "Succeeded"
    machine = "m" * 63
    instance.apply(vm(machine))  # a VirtualMachine name at its limit is admitted
    assert instance.get("VirtualMachine", machine) is not None


@pytest.mark.parametrize("verb", [["get"], ["describe", "x"], ["delete", "x"], ["annotate", "x", "a=b"]])
def test_an_unknown_kind_is_exit_1_naming_the_kinds_pvlun_has(instance, verb):
    proc = instance.cli(verb[0], "foo", *verb[1:], check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: the server doesn't have a resource type 'foo'")
    assert "datavolume" in line and "persistentvolumeclaim" in line and "volumeattachment" in line

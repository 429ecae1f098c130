"""What `pvlun apply` accepts of VirtualMachinePools and VirtualMachineInstanceReplicaSets, as
KubeVirt's webhooks answer: shaped as KubeVirt's examples (v1alpha1, `creationTimestamp: null`
in the template), accepted; a selector that does not
select the template's labels, bad replicas, an invalid VM or VMI template refused naming the
field. And the pure parts: label selectors, the indexed VM spec of a pool."""

from __future__ import annotations

import pytest
import yaml

from controlplane.admission import Refused, known_kind, load_documents
from controlplane.label_selectors import matches, selector_string
from controlplane.replica_specs import indexed_vm_spec, pool_vm
from virt.guest_images import tick_vm_manifest


def pool(**spec_changes) -> dict:
    vm = yaml.safe_load(tick_vm_manifest("t", "http://images.example/t.img"))
    labels = {"kubevirt.io/vmpool": "p"}
    vm["spec"]["template"]["metadata"]["labels"] = labels
    spec = {"replicas": 2, "selector": {"matchLabels": labels},
            "virtualMachineTemplate": {"metadata": {"creationTimestamp": None, "labels": labels}, "spec": vm["spec"]}}
    spec.update(spec_changes)
    return {"apiVersion": "pool.kubevirt.io/v1alpha1", "kind": "VirtualMachinePool", "metadata": {"name": "p"},
            "spec": spec}


def replica_set(**spec_changes) -> dict:
    labels = {"kubevirt.io/vmReplicaSet": "r"}
    spec = {"replicas": 2, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"domain": {"devices": {"disks": [{"name": "d", "disk": {"bus": "virtio"}}]},
                                             "resources": {"requests": {"memory": "64Mi"}}},
                                  "volumes": [{"name": "d", "containerDisk": {"image": "registry.example/t:v1"}}]}}}
    spec.update(spec_changes)
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceReplicaSet", "metadata": {"name": "r"},
            "spec": spec}


def refusal(obj: dict) -> str:
    with pytest.raises(Refused) as caught:
        load_documents(yaml.safe_dump(obj))
    return str(caught.value)


def test_both_kinds_and_their_short_names_are_served():
    assert load_documents(yaml.safe_dump(pool()))[0]["spec"]["replicas"] == 2
    assert load_documents(yaml.safe_dump(dict(pool(), apiVersion="pool.kubevirt.io/v1beta1")))
    assert load_documents(yaml.safe_dump(replica_set()))
    assert {known_kind(n) for n in ("vmpool", "vmpools")} == {"VirtualMachinePool"}
    assert {known_kind(n) for n in ("vmirs", "vmirss")} == {"VirtualMachineInstanceReplicaSet"}
    assert "pool.kubevirt.io/v1beta1 or pool.kubevirt.io/v1alpha1" in refusal(dict(pool(),
                                                                                    apiVersion="pool.kubevirt.io/v2"))


def test_a_selector_that_misses_the_template_labels_is_refused_naming_the_field():
    assert "spec.selector: selector does not match labels (spec.virtualMachineTemplate.metadata.labels)" in \
        refusal(pool(selector={"matchLabels": {"kubevirt.io/vmpool": "other"}}))
    assert "spec.selector: selector does not match labels (spec.template.metadata.labels)" in \
        refusal(replica_set(selector={"matchExpressions": [{"key": "kubevirt.io/vmReplicaSet", "operator": "NotIn",
                                                            "values": ["r"]}]}))
    assert "spec.selector.matchExpressions[0].operator: 'Has' is not a valid label selector operator" in \
        refusal(replica_set(selector={"matchExpressions": [{"key": "a", "operator": "Has"}]}))
    bad_key = {"matchExpressions": [{"key": "Bad_Key_", "operator": "DoesNotExist"}]}
    assert "spec.selector.matchExpressions: key 'Bad_Key_' is not a qualified name" in \
        refusal(replica_set(selector=bad_key))
    bad_value = {"matchLabels": {"kubevirt.io/vmpool": "p"},
                 "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["not a valid value!"]}]}
    assert "spec.selector.matchExpressions[tier]: value 'not a valid value!' is not a valid label value" in \
        refusal(pool(selector=bad_value))
    assert "spec.selector.matchLabels: the prefix of key 'Bad.Prefix/a'" in \
        refusal(pool(selector={"matchLabels": {"kubevirt.io/vmpool": "p", "Bad.Prefix/a": "x"}}))
    assert "spec.selector.matchExpressions[0].values: must be specified when `operator` is 'In' or 'NotIn'" in \
        refusal(replica_set(selector={"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}))
    no_selector = pool()
    del no_selector["spec"]["selector"]
    assert "spec.selector is required" in refusal(no_selector)


def test_bad_replicas_and_bad_templates_are_refused_naming_the_field():
    assert "spec.replicas: must be an integer of 0 or more, not -1" in refusal(pool(replicas=-1))
    assert "spec.replicas: must be an integer, not a string" in refusal(replica_set(replicas="two"))
    assert "spec.replicas: 100000000000000000000 is more than an int32 holds (at most 2147483647)" in \
        refusal(replica_set(replicas=100000000000000000000))
    assert "spec.replicas: 2147483648 is more than an int32" in refusal(pool(replicas=2**31))
    broken = pool()
    broken["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"]["domain"]["devices"]["disks"][0]["disk"] = \
        {"bus": "floppy"}
    assert "spec.virtualMachineTemplate.spec.template.spec.domain.devices.disks[0]" in refusal(broken)
    assert "spec.virtualMachineTemplate.spec is required" in refusal(pool(virtualMachineTemplate=None))
    no_volume = replica_set()
    no_volume["spec"]["template"]["spec"]["volumes"] = []
    assert "VirtualMachineInstanceReplicaSet 'r' is invalid: spec.template.spec.domain.devices.disks[0].name: no " \
           "volume named 'd'" in refusal(no_volume)
    assert "spec.autohealing: not supported" in refusal(pool(autohealing={}))
    assert "spec.nameGeneration.appendIndexToSecretRefs: not supported" in \
        refusal(pool(nameGeneration={"appendIndexToSecretRefs": True}))
    assert "spec.scaleInStrategy.proactive.statePreservation: not supported" in \
        refusal(pool(scaleInStrategy={"proactive": {"statePreservation": "Offline"}}))
    long_name = dict(pool(), metadata={"name": "p" * 62})  # its VMs' names, p...p-0, are no DNS label
    assert "spec.virtualMachineTemplate.metadata.name is 64 characters long; at most 63" in refusal(long_name)


def test_label_selectors_match_and_print_as_kubernetes_does():
    selector = {"matchLabels": {"b": "1"}, "matchExpressions": [{"key": "a", "operator": "In", "values": ["y", "x"]},
                                                                {"key": "c", "operator": "DoesNotExist"}]}
    assert selector_string(selector) == "a in (x,y),b=1,!c"
    assert matches(selector, {"a": "x", "b": "1"}) and not matches(selector, {"a": "x", "b": "1", "c": ""})
    assert not matches(selector, {"a": "z", "b": "1"}) and matches({}, {"any": "thing"})


def test_a_pool_vm_gets_its_own_data_volumes_and_the_revision_label():
    obj = dict(pool(), metadata={"name": "p", "uid": "u-1", "namespace": "ns"})
    spec = indexed_vm_spec(obj["spec"], 3)
    assert spec["dataVolumeTemplates"][0]["metadata"]["name"] == "t-root-3"
    assert spec["template"]["spec"]["volumes"][0]["dataVolume"]["name"] == "t-root-3"
    vm = pool_vm(obj, 3, "p-7")
    assert vm["metadata"]["name"] == "p-3" and vm["metadata"]["namespace"] == "ns"
    assert vm["metadata"]["labels"] == {"kubevirt.io/vmpool": "p", "kubevirt.io/vm-pool-revision-name": "p-7"}
    assert vm["spec"]["template"]["metadata"]["labels"]["kubevirt.io/vm-pool-revision-name"] == "p-7"
    assert vm["metadata"]["ownerReferences"] == [{
        "apiVersion": "pool.kubevirt.io/v1alpha1", "kind": "VirtualMachinePool", "name": "p", "uid": "u-1",
        "controller": True, "blockOwnerDeletion": True}]
    assert obj["spec"]["virtualMachineTemplate"]["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] == "t-root"

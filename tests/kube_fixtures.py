"""Fixtures for tests of cluster mode: a Kubernetes API server TEST DOUBLE on 127.0.0.1
and KubeStores built on it from a kubeconfig, exactly as for a real cluster.

    def test_x(kube_api_double, kube_store): ...      # one store, all namespaces
    def test_y(make_kube_store): a, b = make_kube_store(), make_kube_store(watch_namespace="ns")

Every store made is stopped and the double shut down at the end of the test. `wait_until`
waits for what a controller does (its reads and writes are eventual, as on a cluster).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest

from controlplane.kube_store import KubeStore
from kube_api_double import KubeApiDouble


@pytest.fixture
def kube_api_double() -> Iterator[KubeApiDouble]:
    double = KubeApiDouble().start()
    yield double
    double.stop()


@pytest.fixture
def kube_kubeconfig(kube_api_double: KubeApiDouble, tmp_path) -> str:
    """A kubeconfig file whose current context is the double (bearer token, plain HTTP)."""
    return kube_api_double.write_kubeconfig(str(tmp_path / "kubeconfig"))


@pytest.fixture
def make_kube_store(kube_kubeconfig: str) -> Iterator[Callable[..., KubeStore]]:
    """make_kube_store(**options) → a new KubeStore.from_kubeconfig(the double's kubeconfig, **options)."""
    stores: list[KubeStore] = []

    def make(**options: Any) -> KubeStore:
        store = KubeStore.from_kubeconfig(kube_kubeconfig, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.stop()


@pytest.fixture
def kube_store(make_kube_store: Callable[..., KubeStore]) -> KubeStore:
    return make_kube_store()


def wait_until(what: Callable[[], Any], timeout: float = 10.0, said: Callable[[], str] = lambda: "") -> Any:
    """what()'s first true value within `timeout` s; else AssertionError with `said()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what.__doc__ or what} {said()}")

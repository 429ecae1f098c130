"""Leader election on a Lease: one leader at a time, takeover only after the lease ran out,
a lost race refused by the store's resourceVersion check, release at a clean stop."""

from __future__ import annotations

import threading

import pytest

from controlplane.leader import LeaderElector, micro_time, parse_micro_time
from controlplane.store import SQLiteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "catalog.db"))
    yield s
    s.close()


def elector(store, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(store, "pvlun-controller", "pvlun", identity, clock=clock, monotonic=clock)


def test_one_leader_until_it_has_not_been_seen_renewing_for_its_lease(store):
    clock = Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b sees a's lease now
    clock.now += 14
    assert not b.try_acquire_or_renew()  # 15 s lease, seen 14 s ago: still a's
    assert a.try_acquire_or_renew()  # a renews
    clock.now += 1
    assert not b.try_acquire_or_renew()  # b sees the renewal: 15 s more from now
    clock.now += 14
    assert not b.try_acquire_or_renew()
    clock.now += 2
    assert b.try_acquire_or_renew()  # no renewal seen for 16 s: b takes over
    lease = store.get("Lease", "pvlun-controller", "pvlun")
    assert lease["apiVersion"] == "coordination.k8s.io/v1"
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    assert lease["spec"]["leaseDurationSeconds"] == 15
    assert parse_micro_time(lease["spec"]["renewTime"]) == clock.now
    assert not a.try_acquire_or_renew()


def test_the_holders_clock_does_not_count_only_what_the_candidate_saw(store):
    """A holder whose clock runs 10 minutes behind writes renewTimes long past: a candidate that
    compared them with its own clock would take a lease that is being renewed."""
    behind, ours = Clock(), Clock()
    behind.now -= 600
    a = LeaderElector(store, "l", "pvlun", "a", clock=behind, monotonic=behind)
    b = LeaderElector(store, "l", "pvlun", "b", clock=ours, monotonic=ours)
    for _ in range(10):
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
        behind.now += 2
        ours.now += 2


def test_a_write_over_a_lease_changed_since_it_was_read_loses(store):
    clock = Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now += 30
    stale = store.get("Lease", "pvlun-controller", "pvlun")
    assert b.try_acquire_or_renew()  # b wins the expired lease first
    real_get = store.get
    store.get = lambda *args: stale  # a read the expired lease before b's write
    try:
        assert not a.try_acquire_or_renew()
    finally:
        store.get = real_get
    assert store.get("Lease", "pvlun-controller", "pvlun")["spec"]["holderIdentity"] == "b"


def test_a_clean_stop_releases_the_lease_for_an_immediate_takeover(store):
    clock = Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert a.try_acquire_or_renew()
    a.release()
    assert b.try_acquire_or_renew()


def test_run_leads_then_stops_leading_when_renewal_fails_past_the_deadline(store):
    a = LeaderElector(store, "l", "pvlun", "a", lease_seconds=1.5, renew_deadline=0.6, retry_seconds=0.1)
    started, stopped, stopping = threading.Event(), threading.Event(), threading.Event()
    thread = threading.Thread(target=a.run, args=(stopping, started.set, stopped.set))
    thread.start()
    assert started.wait(5) and a.leading.is_set()
    lease = store.get("Lease", "l", "pvlun")
    store.apply(dict(lease, spec=dict(lease["spec"], holderIdentity="intruder", renewTime=micro_time(2e9))))
    assert stopped.wait(5)  # could not renew over the intruder's lease for 0.6 s
    assert not a.leading.is_set()
    thread.join(5)
    stopping.set()


def test_a_renew_deadline_not_shorter_than_the_lease_is_refused(store):
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElector(store, "l", "pvlun", "a", lease_seconds=10, renew_deadline=10)

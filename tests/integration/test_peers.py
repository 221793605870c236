"""Mesh peers: the full coordinator list at registration, list changes within one heartbeat
interval, and failover to another healthy coordinator within two intervals keeping peer ID and
mesh IP (and `tunnelmesh status` saying so).

One cluster per module: A bootstraps, B and C join A; peer-1 registers with A, peer-2 with B.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support import Coordinator, PeerNode, cluster, remove_tree, short_tmp_dir, wait_for

INTERVAL = 1.0
SETTINGS = {"coordinator": {"heartbeat_interval": f"{INTERVAL}s"}}
SLACK = 0.3  # polling granularity of the test plus a busy 2-core machine
CONVERGE = 15.0

pytestmark = pytest.mark.timeout(240)


def version_of(c: Coordinator) -> int | None:
    try:
        resp = requests.get(f"{c.api_url}/api/v1/coordinators", timeout=2,
                            headers={"Authorization": f"Bearer {c.token}"})
        return resp.json()["membership_version"] if resp.status_code == 200 else None
    except requests.RequestException:
        return None


def peer_ids(state: dict[str, Any] | None) -> set[str]:
    return {c["peer_id"] for c in (state or {}).get("coordinators", [])}


class Mesh:
    def __init__(self, coordinators: list[Coordinator], peers: list[PeerNode]) -> None:
        self.coordinators, self.peers = coordinators, peers


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    root = short_tmp_dir()
    members: list[Coordinator] = []
    peers = [PeerNode(root, "peer-1", heartbeat_interval=f"{INTERVAL}s"),
             PeerNode(root, "peer-2", heartbeat_interval=f"{INTERVAL}s")]
    try:
        with cluster(root, 3, settings=SETTINGS) as coordinators:
            members.extend(coordinators)
            a, b, _ = coordinators
            peers[0].start(a, a.token)
            peers[1].start(b, a.token)
            for p in peers:
                wait_for(lambda p=p: (p.state() or {}).get("mesh_ip"), 30, f"{p.name} to register")
            yield Mesh(members, peers)
            for p in peers:
                p.cleanup()
    finally:
        for p in peers:
            p.cleanup()
        for node in members[3:]:
            node.cleanup()
        remove_tree(root)


def wait_list_change(mesh: Mesh, live: list[Coordinator], change: Any, expected: set[str]) -> None:
    """Run ``change``; then for every live peer measure from the moment its coordinator holds the new
    membership version to the moment the peer holds the new list: at most one heartbeat interval."""
    before = version_of(live[0])
    change()
    target = wait_for(lambda: (v := version_of(live[0])) != before and v, CONVERGE, "a new membership version")
    coordinator_at: dict[str, float] = {}
    peer_at: dict[str, float] = {}
    deadline = time.monotonic() + CONVERGE
    by_url = {c.api_url: c for c in mesh.coordinators}
    while len(peer_at) < len(mesh.peers) and time.monotonic() < deadline:
        for p in mesh.peers:
            state = p.state() or {}
            own = by_url.get(state.get("coordinator", {}).get("api_url"))
            if p.name not in coordinator_at and own is not None and (version_of(own) or 0) >= target:
                coordinator_at[p.name] = time.monotonic()
            if p.name not in peer_at and state.get("membership_version", 0) >= target and peer_ids(state) == expected:
                peer_at[p.name] = time.monotonic()
                coordinator_at.setdefault(p.name, peer_at[p.name])
        time.sleep(0.05)
    assert set(peer_at) == {p.name for p in mesh.peers}, f"peers without the new list: {peer_at}"
    for name, at in peer_at.items():
        delay = at - coordinator_at[name]
        print(f"{name} holds the new list {delay:.2f}s after its coordinator")
        assert delay <= INTERVAL + SLACK, f"{name} got the new list {delay:.2f}s after its coordinator"


def test_a_peer_gets_the_full_list_at_registration(mesh: Mesh) -> None:
    a = mesh.coordinators[0]
    expected = {c.peer_id for c in mesh.coordinators}
    state = mesh.peers[0].state()
    assert state["coordinator"]["api_url"] == a.api_url
    # Registered after B and C joined: A's RegisterResponse already listed all three.
    assert peer_ids(state) == expected
    for entry in state["coordinators"]:
        assert set(entry) >= {"name", "peer_id", "mesh_ip", "api_url", "s3_url", "healthy"}
    assert mesh.peers[1].state()["coordinator"]["api_url"] == mesh.coordinators[1].api_url


def test_a_coordinator_added_or_removed_reaches_every_peer_within_one_interval(mesh: Mesh) -> None:
    a, b, c = mesh.coordinators[:3]
    d = Coordinator(a.dir.parent, "coordinator-d", settings=SETTINGS)
    mesh.coordinators.append(d)
    four = {n.peer_id for n in mesh.coordinators}
    wait_list_change(mesh, [a, b, c], lambda: d.start(join=c, token=a.token), four)
    three = four - {d.peer_id}
    wait_list_change(mesh, [a, b, c], lambda: d.run_cli("leave"), three)
    d.stop()


def test_a_killed_coordinator_is_replaced_within_two_intervals(mesh: Mesh) -> None:
    a = mesh.coordinators[0]
    peer = mesh.peers[0]
    before = peer.state()
    assert before["coordinator"]["peer_id"] == a.peer_id
    killed_at = time.monotonic()
    a.kill()
    state = wait_for(lambda: (s := peer.state()) and s["coordinator"]["peer_id"] != a.peer_id and s,
                     2 * INTERVAL + 5, "the peer to register with another coordinator")
    took = time.monotonic() - killed_at
    print(f"failover after {took:.2f}s")
    assert took <= 2 * INTERVAL + SLACK, f"failover took {took:.2f}s"
    assert state["coordinator"]["peer_id"] in {c.peer_id for c in mesh.coordinators[1:3]}
    assert (state["peer_id"], state["mesh_ip"]) == (before["peer_id"], before["mesh_ip"])

    status = peer.status()
    assert status["using"]["peer_id"] == state["coordinator"]["peer_id"]
    assert (status["peer_id"], status["mesh_ip"]) == (before["peer_id"], before["mesh_ip"])
    text = peer.status(as_json=False)
    assert state["coordinator"]["name"] in text and "using coordinator" in text
    # The list still holds A, marked down (not removed) once the coordinators notice.
    wait_for(lambda: {c["peer_id"]: c["healthy"] for c in peer.status()["coordinators"]}.get(a.peer_id) is False,
             CONVERGE, "A listed as down on the peer")

"""Coordinators find each other transitively, agree on one membership view, notice a dead member
(marked down, not removed), see it come back and catch up, and drop a member only when it leaves.

One cluster per module (A bootstraps, B and C join A; D joins C later), heartbeat interval 0.5 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from storage.registry import PeerRegistry, registry_path
from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_for

INTERVAL = 0.5
SETTINGS = {"coordinator": {"heartbeat_interval": f"{INTERVAL}s", "heartbeat_misses": 3}}
CONVERGE = 15.0  # generous bound for 2 shared cores; convergence normally takes about a second

pytestmark = pytest.mark.timeout(240)


def listing(c: Coordinator) -> dict[str, Any] | None:
    try:
        resp = requests.get(f"{c.api_url}/api/v1/coordinators", timeout=2,
                            headers={"Authorization": f"Bearer {c.token}"})
    except requests.RequestException:
        return None
    return resp.json() if resp.status_code == 200 else None


def agree(nodes: list[Coordinator], expected: set[str]) -> dict[str, Any] | None:
    """The common listing when every node lists exactly ``expected`` with one membership version."""
    answers = [listing(c) for c in nodes]
    if any(a is None for a in answers):
        return None
    versions = {(a["membership_version"], a["membership_digest"]) for a in answers}
    ids = [{e["peer_id"] for e in a["coordinators"]} for a in answers]
    return answers[0] if len(versions) == 1 and all(i == expected for i in ids) else None


def healthy_map(c: Coordinator) -> dict[str, bool]:
    answer = listing(c) or {"coordinators": []}
    return {e["peer_id"]: e["healthy"] for e in answer["coordinators"]}


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[Coordinator]]:
    root = short_tmp_dir()
    members: list[Coordinator] = []
    try:
        with cluster(root, 3, settings=SETTINGS) as coordinators:
            members.extend(coordinators)
            yield members
    finally:
        for node in members[3:]:  # D when a test failed before stopping it (cluster() knows only A-C)
            node.cleanup()
        remove_tree(root)


def test_b_and_c_joined_a_and_all_three_know_each_other(nodes: list[Coordinator]) -> None:
    a, b, c = nodes
    expected = {n.peer_id for n in nodes}
    started = time.monotonic()
    common = wait_for(lambda: agree(nodes, expected), CONVERGE, "A, B and C to agree on the membership")
    print(f"converged in {time.monotonic() - started:.1f}s at version {common['membership_version']}")
    # Every node reports every member healthy (they heartbeat each other).
    wait_for(lambda: all(all(healthy_map(n).values()) and len(healthy_map(n)) == 3 for n in nodes),
             CONVERGE, "every member to be healthy everywhere")
    # B's registry knows C's full record (keys, mesh IP) though C never talked to B directly at join.
    registry = PeerRegistry(registry_path(b.data_dir))
    wait_for(lambda: (r := registry.get(c.peer_id)) is not None and r.public_key, CONVERGE, "C's record on B")
    registry.close()


def test_a_fourth_joining_c_appears_on_all(nodes: list[Coordinator]) -> None:
    a, b, c = nodes
    root = a.dir.parent
    d = Coordinator(root, "coordinator-d", settings=SETTINGS)
    nodes.append(d)  # cleaned up by the fixture if a later step fails
    d.start(join=c, token=a.token)
    started = time.monotonic()
    expected = {n.peer_id for n in nodes}
    wait_for(lambda: agree(nodes, expected), CONVERGE, "A-D to agree on four members")
    print(f"D known everywhere after {time.monotonic() - started:.1f}s")


def test_a_killed_coordinator_is_marked_down_not_removed_and_catches_up_when_restarted(
        nodes: list[Coordinator]) -> None:
    a, b, c = nodes[:3]
    live = [n for n in nodes if n is not c]
    c.kill()
    wait_for(lambda: all(healthy_map(n).get(c.peer_id) is False for n in live), 3 * INTERVAL * 3 + CONVERGE / 3,
             "the others to mark C down")
    for n in live:
        assert c.peer_id in healthy_map(n), "a down coordinator stays a member"
    # Something changes while C is down: a new peer registers with A.
    resp = a.register_peer("laptop-while-c-down")
    assert resp.status_code == 200, resp.text
    new_peer = resp.json()["peer_id"]

    c.start(join=a, token=a.token)
    wait_for(lambda: all(healthy_map(n).get(c.peer_id) is True for n in live), CONVERGE, "C up again everywhere")
    registry = PeerRegistry(registry_path(c.data_dir))
    try:
        wait_for(lambda: registry.get(new_peer) is not None, CONVERGE, "C to learn the peer registered meanwhile")
        wait_for(lambda: registry.digest() == PeerRegistry(registry_path(a.data_dir)).digest(), CONVERGE,
                 "C's registry to equal A's")
    finally:
        registry.close()
    wait_for(lambda: agree(nodes, {n.peer_id for n in nodes}), CONVERGE, "one membership view again")


def test_leave_removes_the_member_everywhere(nodes: list[Coordinator]) -> None:
    if len(nodes) < 4 or not nodes[3].running():
        pytest.skip("needs D from test_a_fourth_joining_c_appears_on_all")
    d = nodes[3]
    before = listing(nodes[0])["membership_version"]
    result = d.run_cli("leave")
    assert "left the mesh" in result.stdout
    rest = nodes[:3]
    common = wait_for(lambda: agree(rest, {n.peer_id for n in rest}), CONVERGE, "D gone from every list")
    assert common["membership_version"] > before
    d.stop()

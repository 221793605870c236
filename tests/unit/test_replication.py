"""Replication (issue 5) without processes: what goes to whom, coalescing, the ledger (hints),
pushes between two in-process coordinators over the real endpoints, the endpoints' input checks,
remote chunk reads and the writer cleanup rule."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from flask import Flask

from storage.chunks import ChunkRef
from storage.errors import ChunkMissing
from storage.hints import KIND_BUCKET, KIND_OBJECT, STATE_HINT, STATE_QUEUED, ReplicationLedger
from storage.metadata import OutboxEntry
from storage.objects import ObjectStore
from storage.placement import place
from tunnelmesh import replication
from tunnelmesh.config import ReplicationSettings, settings_from_dict
from tunnelmesh.replication import (
    ChunkFetcher,
    PeerRejected,
    PeerUnavailable,
    ReplicationService,
    chunks_for_peer,
    coalesce_outbox,
    extra_copies_to_drop,
    fan_out,
    fetch_order,
)
from web import replication as web_replication

CHUNK = 64 * 1024
PEERS = ["a" * 16, "b" * 16, "c" * 16]


def refs(n: int) -> list[ChunkRef]:
    return [ChunkRef(hashlib.sha256(str(i).encode()).hexdigest(), 10) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def test_coalescing_keeps_one_item_per_key_buckets_first() -> None:
    entries = [OutboxEntry(1, "put", "b", "k", 0), OutboxEntry(2, "put", "b", "k", 0),
               OutboxEntry(3, "delete", "b", "k", 0), OutboxEntry(4, "put", "b", "j", 0),
               OutboxEntry(5, "create_bucket", "b", "", 0), OutboxEntry(6, "delete_bucket", "b", "", 0)]
    assert coalesce_outbox(entries) == [(KIND_BUCKET, "b", ""), (KIND_OBJECT, "b", "k"), (KIND_OBJECT, "b", "j")]


def test_metadata_goes_to_every_other_coordinator() -> None:
    work = fan_out([(KIND_OBJECT, "b", "k")], PEERS[0], PEERS)
    assert work == [(PEERS[1], KIND_OBJECT, "b", "k"), (PEERS[2], KIND_OBJECT, "b", "k")]
    assert fan_out([(KIND_OBJECT, "b", "k")], PEERS[0], PEERS[:1]) == []


def test_chunks_go_only_to_their_placement_holders() -> None:
    chunks = refs(200)
    chunks.append(chunks[0])  # a repeated chunk is sent once
    per_peer = {peer: chunks_for_peer(chunks, peer, PEERS, 2) for peer in PEERS}
    for peer, wanted in per_peer.items():
        assert len({r.hash for r in wanted}) == len(wanted)
        assert all(peer in place(r.hash, PEERS, 2) for r in wanted)
    # Every chunk reaches exactly two holders, and every coordinator gets a share.
    assert sum(len(w) for w in per_peer.values()) == 2 * 200
    assert all(per_peer.values())


def test_writer_drops_extra_copy_only_when_every_holder_confirmed() -> None:
    chunks = refs(50)
    me = PEERS[0]
    not_mine = [r.hash for r in chunks if me not in place(r.hash, PEERS, 2)]
    assert not_mine
    assert extra_copies_to_drop(chunks, me, PEERS, 2, lambda h: set()) == []
    one_holder = {h: {place(h, PEERS, 2)[0]} for h in not_mine}
    assert extra_copies_to_drop(chunks, me, PEERS, 2, lambda h: one_holder.get(h, set())) == []
    all_confirmed = extra_copies_to_drop(chunks, me, PEERS, 2, lambda h: set(PEERS))
    assert all_confirmed == not_mine  # never a chunk the writer itself holds by placement
    # A single coordinator keeps everything.
    assert extra_copies_to_drop(chunks, me, [me], 2, lambda h: set(PEERS)) == []


def test_fetch_order_asks_holders_first_never_self() -> None:
    for ref in refs(20):
        order = fetch_order(ref.hash, PEERS[0], PEERS, 2)
        holders = [p for p in place(ref.hash, PEERS, 2) if p != PEERS[0]]
        assert order[: len(holders)] == holders and PEERS[0] not in order
        assert sorted(order) == sorted(PEERS[1:])


def test_retry_delays_grow_and_are_capped() -> None:
    from tasks.replicate import retry_delay

    rep = ReplicationSettings(retry_backoff=1.0, retry_backoff_max=8.0)
    for retries, ceiling in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)):
        for _ in range(20):
            assert ceiling / 2 <= retry_delay(rep, retries) <= ceiling


# ---------------------------------------------------------------------------------------------
# Ledger (pending items and hints)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ReplicationLedger]:
    led = ReplicationLedger(tmp_path / "replication.db")
    yield led
    led.close()


def test_ledger_coalesces_while_a_task_is_queued(ledger: ReplicationLedger) -> None:
    item = ("p", KIND_OBJECT, "b", "k")
    assert ledger.add([item]) == [item]
    assert ledger.add([item]) == []  # the queued task will read the current record
    gen = ledger.claim(*item)
    assert ledger.add([item]) == [item]  # started before this write: a new task is needed
    assert not ledger.done(*item, gen)  # rewritten since the claim: kept
    gen2 = ledger.claim(*item)
    assert ledger.done(*item, gen2) and ledger.items() == []


def test_ledger_hints_survive_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "replication.db"
    led = ReplicationLedger(path)
    item = ("p", KIND_OBJECT, "b", "k")
    led.add([item])
    led.claim(*item)
    led.mark_hint(*item, "connection refused")
    led.close()
    reopened = ReplicationLedger(path)
    hints = reopened.items(state=STATE_HINT)
    assert [(h.peer, h.kind, h.bucket, h.key, h.last_error) for h in hints] == [(*item, "connection refused")]
    assert reopened.peers_with(STATE_HINT) == ["p"]
    assert reopened.add([item]) == [item]  # a new write for a hinted item enqueues again
    reopened.requeue(hints)
    assert [i.state for i in reopened.items()] == [STATE_QUEUED]
    reopened.close()


def test_ledger_chunk_confirmations(ledger: ReplicationLedger) -> None:
    ledger.confirm_chunks("p", ["h1", "h2"])
    ledger.confirm_chunks("q", ["h1"])
    assert ledger.confirmed_peers("h1") == {"p", "q"} and ledger.confirmed_peers("h3") == set()
    ledger.forget_chunk("h1")
    assert ledger.confirmed_peers("h1") == set()


# ---------------------------------------------------------------------------------------------
# Two or three in-process coordinators talking over the real endpoints
# ---------------------------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, resp: Any) -> None:
        self.status_code = resp.status_code
        self.content = resp.get_data()
        self.text = self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.content)


class Mesh:
    """Coordinators sharing one fake network: URL host = peer ID, routed to that peer's Flask app."""

    def __init__(self, root: Path, n: int) -> None:
        self.settings = settings_from_dict({"name": "t", "storage": {"chunk_size": CHUNK, "min_free_space": 0},
                                            "replication": {"factor": 2, "peer_timeout": 2}})
        self.ids = PEERS[:n]
        self.down: set[str] = set()
        self.corrupt: set[str] = set()
        self.stores: dict[str, ObjectStore] = {}
        self.apps: dict[str, Flask] = {}
        for peer in self.ids:
            store = ObjectStore(root / peer, peer, chunk_size=CHUNK, fsync=False)
            app = Flask(peer)
            app.extensions["tunnelmesh_settings"] = self.settings
            app.extensions[web_replication._STORE_KEY] = store
            app.register_blueprint(web_replication.bp)
            self.stores[peer], self.apps[peer] = store, app
        self.members = [SimpleNamespace(peer_id=p, name=p, api_url=f"http://{p}") for p in self.ids]

    def client_for(self, sender: str) -> Any:
        mesh = self

        class Client:
            def request(self, method: str, url: str, *, json: Any = None, data: Any = None,
                        headers: Any = None, timeout: Any, stream: bool = False) -> FakeResponse:
                host, path = url.split("://", 1)[1].split("/", 1)
                if host in mesh.down:
                    raise requests.ConnectionError(f"{host} is down")
                resp = mesh.apps[host].test_client().open("/" + path, method=method, json=json, data=data,
                                                          headers=headers)
                result = FakeResponse(resp)
                if host in mesh.corrupt and method == "GET" and result.status_code == 200:
                    result.content = b"X" + result.content[1:]
                return result

        return Client()

    def service(self, peer: str) -> ReplicationService:
        ledger = ReplicationLedger(self.stores[peer].data_dir / "meta" / "replication.db")
        return ReplicationService(self.settings, store=self.stores[peer], ledger=ledger,
                                  client=self.client_for(peer), self_id=peer)


@pytest.fixture
def mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mesh]:
    m = Mesh(tmp_path, 3)
    monkeypatch.setattr(replication, "coordinator_members", lambda settings: m.members)
    monkeypatch.setattr(web_replication, "_authorize", lambda: None)
    monkeypatch.setattr(replication, "replication_slot", _no_slot)
    yield m
    for store in m.stores.values():
        store.close()


class _no_slot:
    def __init__(self, *args: Any) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def put(store: ObjectStore, key: str, data: bytes, bucket: str = "b") -> Any:
    return store.put_object(bucket, key, io.BytesIO(data), content_length=len(data))


def run_queue(mesh: Mesh, writer: str) -> list[tuple[str, str, str, str]]:
    """Drain the writer's outbox and run every task it enqueued, synchronously."""
    svc = mesh.service(writer)
    queued: list[tuple[str, str, str, str]] = []
    svc.drain_outbox(lambda *item: queued.append(item))
    for item in queued:
        svc.replicate(*item)
    return queued


def holders_on_disk(mesh: Mesh, chunk_hash: str) -> set[str]:
    return {peer for peer, store in mesh.stores.items() if store.chunks.exists(chunk_hash)}


def test_push_reaches_every_coordinator_and_each_chunk_ends_on_factor_holders(mesh: Mesh) -> None:
    a = mesh.ids[0]
    writer = mesh.stores[a]
    writer.create_bucket("b", "owner")
    data = os.urandom(10 * CHUNK + 7)
    for _ in range(3):  # overwrites while pending: one task per peer, newest version
        record = put(writer, "big", data)
    put(writer, "empty", b"")
    queued = run_queue(mesh, a)
    assert len(queued) == 2 * 3  # bucket, big, empty x two peers
    assert writer.meta.outbox_after(0) == []
    for store in mesh.stores.values():
        remote = store.head_object("b", "big")
        assert remote.vv == record.vv and remote.etag == record.etag
        assert store.head_object("b", "empty").size == 0
        assert [o.key for o in store.list_objects("b").objects] == ["big", "empty"]
    for ref in record.chunks:
        assert holders_on_disk(mesh, ref.hash) == set(place(ref.hash, mesh.ids, 2))
    # Any coordinator reads the bytes, fetching what it does not hold.
    for peer, store in mesh.stores.items():
        store.chunk_fetcher = ChunkFetcher(mesh.settings, mesh.service(peer))
        assert b"".join(store.read_object(store.head_object("b", "big"))) == data
    # Replaying everything changes nothing (idempotent, no echo: receivers wrote no outbox rows).
    for item in queued:
        mesh.service(a).replicate(*item)
    for peer in mesh.ids[1:]:
        assert mesh.stores[peer].meta.outbox_after(0) == []


def test_delete_travels_as_a_tombstone(mesh: Mesh) -> None:
    a = mesh.ids[0]
    mesh.stores[a].create_bucket("b", "owner")
    put(mesh.stores[a], "k", b"hello")
    run_queue(mesh, a)
    mesh.stores[a].delete_object("b", "k")
    run_queue(mesh, a)
    for store in mesh.stores.values():
        assert store.meta.get_object("b", "k").deleted


def test_dead_peer_raises_unavailable_and_others_proceed(mesh: Mesh) -> None:
    a, b, c = mesh.ids
    mesh.stores[a].create_bucket("b", "owner")
    put(mesh.stores[a], "k", os.urandom(3 * CHUNK))
    mesh.down.add(b)
    svc = mesh.service(a)
    queued: list[tuple[str, str, str, str]] = []
    svc.drain_outbox(lambda *item: queued.append(item))
    failed = []
    for item in queued:
        try:
            svc.replicate(*item)
        except PeerUnavailable:
            failed.append(item)
            svc.record_hint(*item, "down")
    assert {item[0] for item in failed} == {b}
    assert mesh.stores[c].head_object("b", "k")
    # B is back: its hints replay (only B's), and it catches up.
    mesh.down.clear()
    replayed: list[tuple[str, str, str, str]] = []
    assert svc.replay_hints(lambda *item: replayed.append(item), is_up=lambda peer: peer == b) == len(failed)
    for item in replayed:
        svc.replicate(*item)
    assert mesh.stores[b].head_object("b", "k").etag == mesh.stores[a].head_object("b", "k").etag
    assert svc.ledger.items() == []


def test_fetcher_skips_down_and_corrupt_holders(mesh: Mesh) -> None:
    a, b, c = mesh.ids
    data = os.urandom(CHUNK)
    ref = mesh.stores[b].chunks.write(data)
    mesh.stores[c].chunks.write(data)
    fetcher = ChunkFetcher(mesh.settings, mesh.service(a))
    assert fetcher(ref) == data
    mesh.corrupt.add(b)
    assert fetcher(ref) == data
    mesh.corrupt.clear()
    mesh.down.add(c)
    assert fetcher(ref) == data
    mesh.down.add(b)
    with pytest.raises(ChunkMissing):
        fetcher(ref)


def test_peer_errors_map_to_retry_or_reject(mesh: Mesh) -> None:
    svc = mesh.service(mesh.ids[0])
    member = mesh.members[1]
    with pytest.raises(PeerRejected):
        svc._request(member, "POST", "/object", json={"object": {"bucket": "b"}})
    mesh.down.add(member.peer_id)
    with pytest.raises(PeerUnavailable):
        svc._request(member, "POST", "/object", json={})


# ---------------------------------------------------------------------------------------------
# Endpoint input validation
# ---------------------------------------------------------------------------------------------


def test_endpoints_validate_input(mesh: Mesh) -> None:
    client = mesh.apps[mesh.ids[1]].test_client()
    good = os.urandom(100)
    name = hashlib.sha256(good).hexdigest()
    assert client.put("/api/v1/replication/chunks/NOTAHASH", data=good).status_code == 400
    assert client.put("/api/v1/replication/chunks/../../etc", data=good).status_code in (400, 404)
    assert client.put(f"/api/v1/replication/chunks/{'0' * 64}", data=good).status_code == 422
    assert client.get(f"/api/v1/replication/chunks/{name}").status_code == 404
    for _ in range(2):  # idempotent
        assert client.put(f"/api/v1/replication/chunks/{name}", data=good).status_code == 201
    assert client.get(f"/api/v1/replication/chunks/{name}").data == good
    have = client.post("/api/v1/replication/chunks/have", json={"hashes": [name, "1" * 64]})
    assert have.json == {"have": [name]}
    assert client.post("/api/v1/replication/chunks/have", json={"hashes": ["x"]}).status_code == 400
    assert client.post("/api/v1/replication/chunks/have", data=b"nope").status_code == 400
    assert client.post("/api/v1/replication/object", json={"object": "x"}).status_code == 400
    assert client.post("/api/v1/replication/object", json={"object": {"key": 1}}).status_code == 400
    assert client.post("/api/v1/replication/bucket", json={"bucket": {"name": "b"}}).status_code == 400
    source = mesh.stores[mesh.ids[0]]
    source.create_bucket("b", "owner")
    record = put(source, "k", good)
    payload = {"object": record.to_dict(), "bucket": source.get_bucket("b").to_dict()}
    assert client.post("/api/v1/replication/object", json=payload).json["changed"] is True
    assert client.post("/api/v1/replication/object", json=payload).json["changed"] is False
    bad = dict(payload["object"], chunks=[["../x", 1]])
    assert client.post("/api/v1/replication/object", json={"object": bad, "bucket": payload["bucket"]}).status_code == 400


def test_endpoints_refuse_unsigned_callers(tmp_path: Path) -> None:
    app = Flask("t")
    app.register_blueprint(web_replication.bp)
    resp = app.test_client().post("/api/v1/replication/chunks/have", json={"hashes": []})
    assert resp.status_code == 401


def test_outbox_is_kept_without_a_membership_view(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    a = mesh.ids[0]
    mesh.stores[a].create_bucket("b", "owner")
    monkeypatch.setattr(replication, "coordinator_members", lambda settings: [])
    assert mesh.service(a).drain_outbox(lambda *item: None) == 0
    assert len(mesh.stores[a].meta.outbox_after(0)) == 1

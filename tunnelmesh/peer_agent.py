"""The mesh peer agent: what ``tunnelmesh join HOST:PORT`` runs on a node without coordinator mode.

It registers with a coordinator (mesh token + proof of key ownership), keeps the coordinator list
in ``data_dir/peer/state.json`` and sends a signed heartbeat (``POST /api/v1/peers/heartbeat``)
every ``coordinator.heartbeat_interval``. Each answer carries the coordinator list with health and
the membership version, so list changes arrive with the next heartbeat (no polling of its own).

Failover: when the coordinator in use does not answer a heartbeat (connection refused, timeout of
half an interval, 5xx), the agent at once re-registers with another coordinator from its list
(healthy ones first), so it is served again within two heartbeat intervals. Its peer ID comes from
its own key and the peer registry is replicated between coordinators, so it keeps its peer ID and
mesh IP. ``tunnelmesh status`` reads the state file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from storage.membership import is_newer
from tunnelmesh import node
from tunnelmesh.config import Settings
from tunnelmesh.identity import NodeIdentity, load_or_create_identity
from tunnelmesh.peer_client import PeerClient, tls_verify

STATE_FILE = Path("peer") / "state.json"
HEARTBEAT_PATH = "/api/v1/peers/heartbeat"


def state_path(settings: Settings) -> Path:
    return settings.data_dir / STATE_FILE


def read_state(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(settings).read_text())
    except (FileNotFoundError, ValueError):
        return None


class PeerAgent:
    """Registration, heartbeats and failover of one mesh peer (see the module doc)."""

    def __init__(self, settings: Settings, token: str, *, log: Callable[[str], None] = print,
                 identity: NodeIdentity | None = None) -> None:
        self.settings = settings
        self.token = token
        self.identity = identity or load_or_create_identity(settings.data_dir)
        self.client = PeerClient(settings, self.identity)
        self.log = log
        self.stop_event = threading.Event()
        self.interval = settings.coordinator.heartbeat_interval
        self.state: dict[str, Any] = read_state(settings) or {}

    # -- state file ---------------------------------------------------------------------------

    def _save(self) -> None:
        path = state_path(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.state["updated_at"] = time.time()
        self.state["pid"] = os.getpid()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, path)  # status never reads a half-written file

    def _take_list(self, answer: dict[str, Any], *, force: bool = False) -> None:
        """Adopt the coordinator list of an answer when it is newer (health flags always)."""
        version, digest = answer.get("membership_version"), answer.get("membership_digest")
        coordinators = answer.get("coordinators")
        if not isinstance(version, int) or not isinstance(digest, str) or not isinstance(coordinators, list):
            return
        held = (self.state.get("membership_version", -1), self.state.get("membership_digest", ""))
        if force or is_newer((version, digest), held) or (version, digest) == held:
            if (version, digest) != held:
                names = ", ".join(str(c.get("name")) for c in coordinators if isinstance(c, dict))
                self.log(f"coordinator list version {version}: {names}")
            self.state.update(membership_version=version, membership_digest=digest, coordinators=coordinators)

    # -- registration ---------------------------------------------------------------------------

    def register(self, url: str) -> dict[str, Any]:
        """Register with the coordinator at ``url``; raises node.RegistrationError."""
        payload = node.sign_registration(self.identity, {
            "name": self.settings.name, "public_key": self.identity.public_key_b64, "addresses": [],
            "is_coordinator": False, "version": node.version()})
        timeout = max(1.0, 2 * self.interval)
        result = node.register_with(url, self.token, payload, timeout=timeout, verify=tls_verify(self.settings))
        resp = result.response
        previous = (self.state.get("peer_id"), self.state.get("mesh_ip"))
        self.state.update(
            peer_id=resp["peer_id"], peer_name=resp.get("peer_name"), mesh_ip=resp["mesh_ip"],
            mesh_cidr=resp.get("mesh_cidr"), is_admin=resp.get("is_admin"),
            coordinator={"peer_id": resp.get("server_peer_id"), "name": resp.get("server_name"), "api_url": url},
            registered_at=time.time(), last_heartbeat_ok=time.time())
        self.state.setdefault("registrations", 0)
        self.state["registrations"] += 1
        self._take_list(resp, force=True)
        self._save()
        self.log(f"registered with {resp.get('server_name')} at {url}: peer ID {resp['peer_id']}, "
                 f"mesh IP {resp['mesh_ip']}" + ("" if previous in ((None, None), (resp["peer_id"], resp["mesh_ip"]))
                                                 else f" (was {previous})"))
        return resp

    def _candidates(self, exclude: str | None) -> list[str]:
        listed = [c for c in self.state.get("coordinators", []) if isinstance(c, dict) and c.get("api_url")]
        # Healthy ones first; the one that just failed last (it may come back).
        listed.sort(key=lambda c: (c.get("peer_id") == exclude, not c.get("healthy", False)))
        return [str(c["api_url"]).rstrip("/") for c in listed]

    def failover(self, failed: str | None) -> bool:
        """Register with another coordinator of the list; True on success."""
        for c in self.state.get("coordinators", []):
            if isinstance(c, dict) and c.get("peer_id") == failed:
                c["healthy"] = False  # what this peer saw, until a coordinator says otherwise
        for url in self._candidates(failed):
            try:
                self.register(url)
                return True
            except node.RegistrationError as exc:
                self.log(f"failover to {url} failed: {exc}")
        self._save()
        return False

    # -- heartbeats -------------------------------------------------------------------------------

    def heartbeat(self) -> bool:
        """One heartbeat to the coordinator in use; False when it must be replaced."""
        current = self.state.get("coordinator") or {}
        url = current.get("api_url")
        if not url:
            return False
        timeout = max(0.2, self.interval / 2)
        try:
            resp = self.client.request("POST", url + HEARTBEAT_PATH, timeout=(timeout, timeout), json={
                "membership_version": self.state.get("membership_version", 0)})
        except requests.RequestException as exc:
            self.log(f"coordinator {current.get('name')} at {url} does not answer ({type(exc).__name__})")
            return False
        if resp.status_code == 401:
            # Not (or no longer) known there: register again with the same coordinator.
            with contextlib.suppress(node.RegistrationError):
                self.register(url)
                return True
            return False
        if resp.status_code != 200:
            self.log(f"coordinator {current.get('name')} answered HTTP {resp.status_code}")
            return False
        try:
            self._take_list(resp.json())
        except ValueError:
            return False
        self.state["last_heartbeat_ok"] = time.time()
        self._save()
        return True

    def run(self, first_url: str | None) -> int:
        """Register (through ``first_url`` or the saved list), then heartbeat until stopped."""
        registered = False
        if first_url:
            try:
                self.register(first_url)
                registered = True
            except node.RegistrationError as exc:
                if not exc.retryable or not self.state.get("coordinators"):
                    raise
                self.log(f"{exc}; trying the saved coordinator list")
        while not registered and not self.stop_event.is_set():
            registered = self.failover(None)
            if not registered:
                self.stop_event.wait(self.interval)
        next_tick = time.monotonic() + self.interval
        while not self.stop_event.wait(max(0.0, next_tick - time.monotonic())):
            next_tick += self.interval
            if time.monotonic() > next_tick:  # fell behind (suspended): do not burst
                next_tick = time.monotonic() + self.interval
            if not self.heartbeat():
                failed = (self.state.get("coordinator") or {}).get("peer_id")
                self.failover(failed)
        self.log("peer agent stopped")
        return 0

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

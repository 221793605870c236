"""Who is an S3 admin: exact peer IDs in admin_peers, name globs over the registered name, the
registry's is_admin flag, and the node itself; everyone else only uses their own buckets."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from storage.registry import PeerRegistry, registry_path
from tunnelmesh.config import settings_from_dict
from tunnelmesh.identity import peer_id_from_public_key
from web.s3.access import can_use_bucket
from web.s3.service import S3Service


class Bucket:
    def __init__(self, name: str, owner: str) -> None:
        self.name, self.owner = name, owner


def register(data_dir: Path, name: str) -> str:
    key = os.urandom(32)
    peer_id = peer_id_from_public_key(key)
    registry = PeerRegistry(registry_path(data_dir))
    registry.register(peer_id=peer_id, name=name, public_key=base64.b64encode(key).decode(),
                      mesh_cidr="10.42.0.0/16")
    registry.close()
    return peer_id


def test_admin_by_name_glob_exact_id_and_self(tmp_path: Path) -> None:
    exact = "0123456789abcdef"
    settings = settings_from_dict({"name": "coordinator-a", "coordinator": {
        "enabled": True, "data_dir": str(tmp_path), "admin_peers": ["ops-*", exact]}})
    ops = register(tmp_path, "ops-1")
    dev = register(tmp_path, "dev-1")
    service = S3Service(settings)
    bucket = Bucket("photos", owner="fedcba9876543210")

    assert service.principal(ops).is_admin
    assert service.principal(exact).is_admin
    assert service.principal(service.node_peer_id).is_admin
    assert not service.principal(dev).is_admin
    assert not service.principal("1111111111111111").is_admin  # unknown to the registry
    assert can_use_bucket(service.principal(ops), bucket)
    assert not can_use_bucket(service.principal(dev), bucket)
    assert can_use_bucket(service.principal(dev), Bucket("mine", owner=dev))

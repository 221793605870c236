"""Who may do what.

- Every authenticated node of the mesh (a valid SigV4 signature with its derived key) may create
  buckets; a bucket belongs to the peer that created it.
- Only the owner of a bucket may use it (objects, listings, uploads, deletion); every other
  non-admin peer gets AccessDenied (a bucket that does not exist is NoSuchBucket, as in S3).
- Admins may use every bucket and list all buckets: the peers matching ``coordinator.admin_peers``
  (an exact peer ID, or a glob over the name the peer registry holds for it), peers the registry
  marks ``is_admin``, and this node itself, which administers its own coordinator.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from web.s3.errors import S3Error


class OwnedBucket(Protocol):
    name: str
    owner: str


BucketT = TypeVar("BucketT", bound=OwnedBucket)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    peer_id: str
    is_admin: bool


def principal_for(peer_id: str, *, node_peer_id: str, admin_peers: Iterable[str],
                  registered_admin: bool = False) -> Principal:
    """``registered_admin``: the peer registry says so (admin_peers name globs, decided at
    registration from the registered name)."""
    is_admin = registered_admin or peer_id == node_peer_id or peer_id in set(admin_peers)
    return Principal(peer_id=peer_id, is_admin=is_admin)


def can_use_bucket(principal: Principal, bucket: OwnedBucket) -> bool:
    return principal.is_admin or bucket.owner == principal.peer_id


def check_bucket_access(principal: Principal, bucket: OwnedBucket, resource: str) -> None:
    """Raise AccessDenied unless ``principal`` may use ``bucket``."""
    if not can_use_bucket(principal, bucket):
        raise S3Error("AccessDenied", f"Access Denied: the bucket {bucket.name!r} belongs to another node.",
                      resource=resource)


def visible_buckets(principal: Principal, buckets: Iterable[BucketT]) -> list[BucketT]:
    """ListBuckets: a node sees its own buckets; admins see all of them."""
    return [bucket for bucket in buckets if can_use_bucket(principal, bucket)]

"""Node identity, the mesh token and S3 credentials.

- A node's identity is an ed25519 key pair created on first start in its data directory
  (``identity/node.key``, mode 0600). Its peer ID is the first 16 hex characters of the SHA-256
  of the raw public key: short enough to type into ``admin_peers``, long enough (64 bits) that
  collisions between honest nodes do not happen.
- The mesh token is the shared secret that admits nodes to the mesh. The bootstrapping
  coordinator generates it and keeps it in ``identity/mesh_token``; joining nodes store the token
  they were given there too.
- S3 credentials are derived with HKDF-SHA256 from the mesh token and the peer ID, so any
  coordinator of the mesh can verify any node's signature without asking another coordinator.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

IDENTITY_DIR = "identity"
KEY_FILE = "node.key"
TOKEN_FILE = "mesh_token"
ACCESS_KEY_PREFIX = "TMAK"  # 4 + 16 hex = 20 characters, the length of an AWS access key ID


def peer_id_from_public_key(public_key: bytes) -> str:
    """16 lowercase hex characters derived from a raw 32-byte ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey

    @property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key_bytes).decode()

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key_bytes)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def verify_signature(public_key_b64: str, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid ed25519 signature of ``message`` by that key."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        key.verify(signature, message)
        return True
    except Exception:  # noqa: BLE001 - any decoding or verification failure means "not valid"
        return False


def load_or_create_identity(data_dir: Path) -> NodeIdentity:
    """The node's key pair, created (atomically, 0600) on first use."""
    path = Path(data_dir) / IDENTITY_DIR / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an ed25519 private key")
        return NodeIdentity(key)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_private(path, pem)
    return NodeIdentity(key)


def generate_token() -> str:
    """A new mesh token: 32 random bytes, URL-safe."""
    return "tm_" + secrets.token_urlsafe(32)


def read_token(data_dir: Path) -> str | None:
    path = Path(data_dir) / IDENTITY_DIR / TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def store_token(data_dir: Path, token: str) -> None:
    _write_private(Path(data_dir) / IDENTITY_DIR / TOKEN_FILE, token.encode() + b"\n")


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


def s3_credentials(mesh_token: str, peer_id: str) -> S3Credentials:
    """The S3 key pair of ``peer_id`` in the mesh whose token is ``mesh_token``."""
    secret = HKDF(algorithm=hashes.SHA256(), length=30, salt=b"tunnelmesh-s3-v1",
                  info=peer_id.encode()).derive(mesh_token.encode())
    return S3Credentials(access_key=ACCESS_KEY_PREFIX + peer_id.upper(),
                         secret_key=base64.b64encode(secret).decode())


def peer_id_from_access_key(access_key: str) -> str | None:
    """The peer ID an access key belongs to, or None if it is not one of ours."""
    rest = access_key[len(ACCESS_KEY_PREFIX):]
    if (access_key.startswith(ACCESS_KEY_PREFIX) and len(rest) == 16
            and all(c in "0123456789ABCDEF" for c in rest)):
        return rest.lower()
    return None

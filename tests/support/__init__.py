"""Shared test helpers that run real processes (see tests/support/coordinator.py)."""

from tests.support.coordinator import (
    Coordinator,
    cluster,
    free_port,
    processes_with_config,
    remove_tree,
    short_tmp_dir,
    tunnelmesh_command,
    wait_converged,
    wait_for,
)
from tests.support.peer import PeerNode

__all__ = [
    "Coordinator",
    "PeerNode",
    "cluster",
    "free_port",
    "processes_with_config",
    "remove_tree",
    "short_tmp_dir",
    "tunnelmesh_command",
    "wait_converged",
    "wait_for",
]

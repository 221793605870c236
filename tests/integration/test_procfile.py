"""``honcho start`` with the repository's Procfile brings up the local mesh of two coordinators.

Runs in a temporary copy of the repository layout (Procfile + examples/, data under its var/) with
the example ports replaced by free ones, so it never touches ./var or collides with a running mesh.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.support import free_port, processes_with_config, remove_tree, short_tmp_dir, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def mesh_copy() -> Iterator[dict[str, object]]:
    root = short_tmp_dir("tm-honcho-")
    (root / "examples").mkdir()
    ports = {}
    for name in ("coordinator-a", "coordinator-b"):
        config = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
        api, s3 = free_port(), free_port()
        ports[name] = (config["coordinator"]["listen"], f"127.0.0.1:{api}")
        config["coordinator"]["listen"] = f"127.0.0.1:{api}"
        config["s3"]["listen"] = f"127.0.0.1:{s3}"
        config["worker"]["concurrency"] = 1
        (root / "examples" / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    procfile = (REPO / "Procfile").read_text()
    old_a, new_a = ports["coordinator-a"]
    assert old_a in procfile, "the Procfile should join coordinator-a at its example address"
    (root / "Procfile").write_text(procfile.replace(old_a, new_a))
    try:
        yield {"root": root, "a": f"http://{new_a}", "b": f"http://{ports['coordinator-b'][1]}"}
    finally:
        remove_tree(root)


def _ready(url: str) -> bool:
    try:
        health = requests.get(f"{url}/health", timeout=2).json()
    except (requests.RequestException, ValueError):
        return False
    return bool(health.get("processes")) and all(s == "running" for s in health["processes"].values())


def test_honcho_start_runs_a_local_mesh_of_two(mesh_copy: dict[str, object]) -> None:
    root = mesh_copy["root"]
    assert isinstance(root, Path)
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="true")
    env.pop("TUNNELMESH_TOKEN", None)
    env.pop("TUNNELMESH_CONFIG", None)
    honcho = shutil.which("honcho", path=env["PATH"])
    assert honcho, "honcho is not installed"
    configs = [(root / "examples" / f"{n}.yaml").resolve() for n in ("coordinator-a", "coordinator-b")]
    log_path = root / "honcho.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([honcho, "start", "-f", "Procfile"], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        try:
            wait_for(lambda: _ready(str(mesh_copy["a"])) and _ready(str(mesh_copy["b"])), 120, "both coordinators")
        except AssertionError:
            raise AssertionError(log_path.read_text(errors="replace")[-4000:]) from None
        root_proc = psutil.Process(proc.pid)
        tree = [root_proc, *root_proc.children(recursive=True)]
        output = log_path.read_text(errors="replace")
        assert "registered with the coordinator at" in output
        assert (root / "var" / "coordinator-a" / "identity" / "mesh_token").read_text() == \
            (root / "var" / "coordinator-b" / "identity" / "mesh_token").read_text()
        health_a = requests.get(f"{mesh_copy['a']}/health", timeout=5).json()
        health_b = requests.get(f"{mesh_copy['b']}/health", timeout=5).json()
        assert (health_a["name"], health_b["name"]) == ("coordinator-a", "coordinator-b")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) is not None
        wait_for(lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
                 and not any(processes_with_config(c) for c in configs), 20, "every process of the mesh to exit")
        output = log_path.read_text(errors="replace")
        assert "sending SIGKILL" not in output, "honcho had to SIGKILL: the coordinators did not stop in time"
        assert output.count("tunnelmesh | stopped") == 2
    finally:
        # Whatever happened: kill honcho, everything under it now or recorded earlier, and every
        # child of the coordinators (found by the config in their environment).
        victims = [p for p in tree if p.is_running()]
        if proc.poll() is None:
            root_proc = psutil.Process(proc.pid)
            victims += [root_proc, *root_proc.children(recursive=True)]
        for config in configs:
            victims += processes_with_config(config)
        for victim in victims:
            try:
                victim.kill()
            except psutil.Error:
                pass
        proc.wait(10)

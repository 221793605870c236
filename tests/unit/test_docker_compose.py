"""docker/docker-compose.yml, checked statically (no Docker daemon here): one full stack per
coordinator, exactly one beat each, healthchecks everywhere, persistent volumes, valid configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tunnelmesh.config import settings_from_dict

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ROLES = ("redis", "web", "s3", "worker", "beat", "flower")
STACKS = ("a", "b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())  # anchors and << merges resolved


def _role(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    if command and command[0] == "redis-server":
        return "redis"
    assert command[:1] == ["run"], command
    return command[1]


def _config_of(service: dict[str, Any]) -> Path | None:
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if rest.startswith("/etc/tunnelmesh/coordinator.yaml"):
            return (DOCKER / source).resolve()
    return None


def test_one_full_stack_per_coordinator(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {f"{role}-{stack}" for role in ROLES for stack in STACKS}
    for stack in STACKS:
        roles = [_role(services[f"{role}-{stack}"]) for role in ROLES]
        assert roles == list(ROLES)


def test_exactly_one_beat_per_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for stack in STACKS:
        beats = [name for name, svc in services.items()
                 if _role(svc) == "beat" and _config_of(svc) == (DOCKER / "config" / f"coordinator-{stack}.yaml").resolve()]
        assert beats == [f"beat-{stack}"]
        deploy = services[f"beat-{stack}"].get("deploy", {})
        assert deploy.get("replicas", 1) == 1


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert "interval" in check and "retries" in check, name
    # The worker's check goes through the broker (a live PID is not a live consumer).
    for stack in STACKS:
        assert "inspect ping" in " ".join(compose["services"][f"worker-{stack}"]["healthcheck"]["test"])


def test_redis_is_persistent_and_never_evicts(compose: dict[str, Any]) -> None:
    for stack in STACKS:
        redis = compose["services"][f"redis-{stack}"]
        command = " ".join(redis["command"])
        assert "--appendonly yes" in command and "--appendfsync everysec" in command
        assert "--maxmemory-policy noeviction" in command
        assert redis["volumes"] == [f"redis-{stack}:/data"]


def test_volumes_are_declared_and_shared_within_a_stack(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    assert declared == {f"{kind}-{stack}" for kind in ("redis", "data") for stack in STACKS}
    for stack in STACKS:
        for role in ("web", "s3", "worker", "beat", "flower"):
            service = compose["services"][f"{role}-{stack}"]
            assert f"data-{stack}:/var/lib/tunnelmesh" in service["volumes"], f"{role}-{stack}"
            assert _config_of(service) == (DOCKER / "config" / f"coordinator-{stack}.yaml").resolve()


def test_dependencies_exist_and_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}, name
    # coordinator-b joins coordinator-a: its web waits for web-a and names it.
    assert "web-a" in services["web-b"]["depends_on"]
    assert services["web-b"]["command"][:3] == ["run", "web", "web-a:8443"]


def test_signals_reach_the_processes(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if _role(service) != "redis":
            assert service["init"] is True, name
            assert service["environment"]["TUNNELMESH_CONFIG"] == "/etc/tunnelmesh/coordinator.yaml"


@pytest.mark.parametrize("stack", STACKS)
def test_the_stack_configs_are_valid(stack: str) -> None:
    path = DOCKER / "config" / f"coordinator-{stack}.yaml"
    settings = settings_from_dict(yaml.safe_load(path.read_text()), str(path))
    assert settings.name == f"coordinator-{stack}" and settings.coordinator.enabled
    assert settings.redis.url == f"redis://redis-{stack}:6379"
    assert settings.coordinator.data_dir == "/var/lib/tunnelmesh"


def test_the_dockerfile_installs_the_project_and_runs_tunnelmesh() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "pip install ." in text
    assert 'ENTRYPOINT ["tunnelmesh"]' in text
    assert "USER tunnelmesh" in text

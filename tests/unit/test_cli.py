"""The ``tunnelmesh`` command without starting a coordinator: help, id, credentials, argument and
token errors, unreachable coordinators, and the promise of one error line and no traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import free_port
from tunnelmesh import cli as cli_module
from tunnelmesh.cli import JOINED_VIA_KEY, main, prepare_node
from tunnelmesh.config import load_config
from tunnelmesh.identity import load_or_create_identity, read_token, s3_credentials, store_token
from tunnelmesh.node import RegistrationError, coordinator_url, open_registry


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "coordinator-a.yaml"
    path.write_text(f"""name: coordinator-a
coordinator:
  enabled: true
  listen: "127.0.0.1:{free_port()}"
  data_dir: "{tmp_path / 'data'}"
s3:
  listen: "127.0.0.1:{free_port()}"
""")
    return path


@pytest.mark.parametrize("command", [[], ["join"], ["id"], ["credentials"], ["run"]])
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([*command, "--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"Usage: tunnelmesh {' '.join(command)}".rstrip())


def test_join_help_shows_the_seed_usage(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(["join", "--help"], capsys)
    assert "Usage: tunnelmesh join [OPTIONS] [HOST:PORT]" in out
    for option in ("--config", "--token", "TUNNELMESH_TOKEN", "--wait"):
        assert option in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("tunnelmesh, version ")


def test_id_prints_a_stable_peer_id(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, first, _ = run(["id", "--config", str(config)], capsys)
    assert code == 0 and re.fullmatch(r"[0-9a-f]{16}\n", first)
    _, second, _ = run(["id", "-c", str(config)], capsys)
    assert first == second
    assert first.strip() == load_or_create_identity(load_config(config).data_dir).peer_id


def test_id_takes_the_config_from_the_environment(config: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNELMESH_CONFIG", str(config))
    code, out, _ = run(["id"], capsys)
    assert code == 0 and len(out.strip()) == 16


def test_credentials_need_a_token(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["credentials", "--config", str(config)], capsys)
    data_dir = load_config(config).data_dir
    assert code == 1 and out == ""
    assert err == (f"error: this node has no mesh token yet ({data_dir}/identity/mesh_token is missing): "
                   "start it once with 'tunnelmesh join'\n")


def test_credentials_print_keys_and_ready_snippets(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_config(config)
    store_token(settings.data_dir, "tm_0123456789abcdef0123456789")
    peer_id = load_or_create_identity(settings.data_dir).peer_id
    creds = s3_credentials("tm_0123456789abcdef0123456789", peer_id)
    endpoint = f"http://{settings.s3.listen}"
    code, out, _ = run(["credentials", "--config", str(config)], capsys)
    assert code == 0
    assert f"Access key ID:     {creds.access_key}" in out
    assert f"Secret access key: {creds.secret_key}" in out
    assert f"S3 endpoint:       {endpoint}" in out
    assert f"aws configure set aws_access_key_id {creds.access_key} --profile coordinator-a" in out
    assert f"aws --profile coordinator-a --endpoint-url {endpoint} s3 ls" in out
    assert f'endpoint_url="{endpoint}"' in out and f'aws_secret_access_key="{creds.secret_key}"' in out

    _, out, _ = run(["credentials", "--json", "--config", str(config)], capsys)
    assert json.loads(out) == {"access_key": creds.access_key, "secret_key": creds.secret_key,
                               "endpoint": endpoint, "region": "us-east-1", "peer_id": peer_id}


def test_a_malformed_token_is_a_usage_error(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["join", "127.0.0.1:1", "--token", "short", "--config", str(config)], capsys)
    assert code == 2
    assert err == ("error: Invalid value for '--token': must be 16-256 printable characters without spaces "
                   "(see 'tunnelmesh join --help')\n")


def test_a_bad_address_is_a_usage_error(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["join", "ftp://host:1", "--token", "tm_0123456789abcdef", "--config", str(config)], capsys)
    assert code == 2
    assert err.startswith("error: Invalid value for 'ADDRESS': 'ftp://host:1' is not a coordinator address")
    assert err.count("\n") == 1


def test_joining_an_unreachable_coordinator_fails_cleanly(config: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("TUNNELMESH_TOKEN", "tm_0123456789abcdef")  # the token may come from the environment
    code, out, err = run(["join", f"127.0.0.1:{port}", "--config", str(config)], capsys)
    assert code == 1
    assert err == f"error: cannot reach the coordinator at http://127.0.0.1:{port} (connection refused)\n"
    settings = load_config(config)
    assert read_token(settings.data_dir) is None  # nothing stored for a mesh it never joined
    # The data directory lock was released: the same command fails the same way again.
    assert run(["join", f"127.0.0.1:{port}", "--config", str(config)], capsys)[0] == 1


def test_join_without_token_names_both_ways_to_give_one(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["join", "127.0.0.1:1", "--config", str(config)], capsys)
    assert code == 1
    assert err.startswith("error: no mesh token: pass --token TOKEN or set TUNNELMESH_TOKEN")


def test_a_data_dir_of_another_mesh_is_refused(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_config(config)
    store_token(settings.data_dir, "tm_the-old-mesh-token")
    code, _, err = run(["join", "127.0.0.1:1", "--token", "tm_another-mesh-token", "--config", str(config)], capsys)
    assert code == 1
    assert "belongs to a mesh with a different token" in err and err.count("\n") == 1


def test_a_member_restarts_while_its_registrar_is_down(config: Path) -> None:
    """A coordinator that joined before starts even when the coordinator it joined through is down."""
    settings = load_config(config)
    store_token(settings.data_dir, "tm_0123456789abcdef")
    registry = open_registry(settings)
    registry.set_state(JOINED_VIA_KEY, "http://127.0.0.1:1")
    registry.close()
    prepared = prepare_node(settings, f"127.0.0.1:{free_port()}", None, wait=0)
    assert prepared.registered_with is None and prepared.token == "tm_0123456789abcdef"


def test_bootstrap_generates_and_keeps_the_token(config: Path) -> None:
    settings = load_config(config)
    first = prepare_node(settings, None, None, wait=0)
    assert first.token_generated and read_token(settings.data_dir) == first.token
    again = prepare_node(settings, None, None, wait=0)
    assert not again.token_generated and again.token == first.token
    registry = open_registry(settings)
    me = registry.get(first.identity.peer_id)
    assert me is not None and me.is_coordinator and me.name == "coordinator-a"


def test_unknown_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["bogus"], capsys)
    assert code == 2 and err == "error: No such command 'bogus'. (see 'tunnelmesh --help')\n"


def test_unexpected_errors_are_one_line_without_traceback(config: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_: str) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli_module, "_load", boom)
    code, _, err = run(["id", "--config", str(config)], capsys)
    assert code == 1
    assert err == "error: unexpected RuntimeError: disk on fire (set TUNNELMESH_DEBUG=1 for a traceback)\n"


@pytest.mark.parametrize("role", ["web", "s3", "worker", "beat", "flower", "redis"])
def test_run_prints_the_command_of_each_role(role: str, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["run", role, "--print", "--config", str(config)], capsys)
    assert code == 0
    expected = {"web": "web.coordination:create_app()", "s3": "web.s3:create_app()",
                "worker": "--queues membership,replication,manifest,rebalance,default", "beat": "celerybeat-schedule",
                "flower": "flower", "redis": "redis.conf"}[role]
    assert expected in out


@pytest.mark.parametrize(("address", "url"), [
    ("coordinator-a.example.com:8443", "http://coordinator-a.example.com:8443"),
    ("10.0.0.1", "http://10.0.0.1:8443"),
    ("[::1]:9443", "http://[::1]:9443"),
    ("https://c.example.com:8443", "https://c.example.com:8443"),
])
def test_coordinator_addresses(address: str, url: str, config: Path) -> None:
    assert coordinator_url(address, load_config(config)) == url


@pytest.mark.parametrize("address", ["", "a:b:c", "host:0", "host:99999", "http://h/x", "ftp://h:1", "h ost:1"])
def test_bad_coordinator_addresses(address: str, config: Path) -> None:
    with pytest.raises(RegistrationError):
        coordinator_url(address, load_config(config))


def test_plain_http_on_a_public_address_is_refused_unless_allowed(tmp_path: Path) -> None:
    from tunnelmesh.cli import check_listeners
    from tunnelmesh.config import ConfigError, settings_from_dict

    def settings(**tls: object) -> object:
        return settings_from_dict({"name": "coordinator-a", "coordinator": {
            "enabled": True, "data_dir": str(tmp_path), "advertise_url": "http://1.2.3.4:8443",  # only classified, never contacted
            "tls": tls}, "s3": {"advertise_url": "http://127.0.0.1:9000"}}, "c.yaml")

    with pytest.raises(ConfigError) as refused:
        check_listeners(settings())
    assert str(refused.value).startswith("c.yaml: coordinator.listen: would serve plain HTTP on the public address")
    check_listeners(settings(allow_insecure_http=True))  # explicitly allowed: starts (with a warning)
    local = settings_from_dict({"name": "coordinator-a", "coordinator": {
        "enabled": True, "data_dir": str(tmp_path), "listen": "127.0.0.1:8443"}}, "c.yaml")
    check_listeners(local)

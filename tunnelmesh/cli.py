"""The ``tunnelmesh`` command.

::

    tunnelmesh join --config coordinator-a.yaml                       # bootstrap a new mesh
    tunnelmesh join HOST:PORT --token TOKEN --config coordinator-b.yaml   # join an existing one
    tunnelmesh id --config coordinator-a.yaml                         # print this node's peer ID
    tunnelmesh credentials --config coordinator-a.yaml                # this node's S3 keys
    tunnelmesh run web|s3|worker|beat|flower|redis --config X         # one process (containers)

Every error is one line on stderr starting with ``error:`` and a non-zero exit: 2 for a bad
command line or config, 1 for anything that went wrong at run time (refused token, unreachable
coordinator, a process that would not start). Set ``TUNNELMESH_DEBUG=1`` to get tracebacks of
unexpected errors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import psutil

from storage.errors import InsufficientStorage, StorageError
from tunnelmesh import node
from tunnelmesh.config import CONFIG_ENV, ConfigError, Settings, load_config
from tunnelmesh.identity import (
    IDENTITY_DIR,
    TOKEN_FILE,
    NodeIdentity,
    generate_token,
    load_or_create_identity,
    read_token,
    s3_credentials,
    store_token,
)

TOKEN_ENV = "TUNNELMESH_TOKEN"
JOINED_VIA_KEY = "joined_via"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CliError(Exception):
    """A run-time failure, reported as one line with exit code 1."""


def _out(message: str = "") -> None:
    click.echo(message)


def _load(config: str) -> Settings:
    return load_config(config)


config_option = click.option(
    "--config", "-c", "config", required=True, envvar=CONFIG_ENV, metavar="FILE",
    type=click.Path(dir_okay=False, path_type=str),
    help=f"YAML config file of this node (or ${CONFIG_ENV}).")


def _check_token(token: str | None) -> str | None:
    if token is None or not token.strip():
        return None
    token = token.strip()
    if not 16 <= len(token) <= 256 or any(c.isspace() or not c.isprintable() for c in token):
        raise click.BadParameter("must be 16-256 printable characters without spaces", param_hint="'--token'")
    return token


# ---------------------------------------------------------------------------------------------
# Preparing a node: identity, token, registration (shared by `join` and `run web`)
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedNode:
    identity: NodeIdentity
    token: str
    token_generated: bool
    registered_with: str | None  # URL of the coordinator this node registered with, if any


def _check_transport(settings: Settings, url: str) -> None:
    from tunnelmesh.peer_client import InsecureTransport, check_transport

    try:
        check_transport(settings, url)
    except InsecureTransport as exc:
        raise CliError(str(exc)) from None


def check_listeners(settings: Settings) -> None:
    """Plain HTTP is served only on loopback or private addresses unless explicitly allowed (then
    with a warning): refuse to start a coordinator that would advertise it on a public one."""
    from tunnelmesh.peer_client import InsecureTransport, check_transport

    if not settings.coordinator.enabled:
        return
    for key, url in (("coordinator.listen", node.api_url(settings)), ("s3.listen", node.s3_url(settings))):
        try:
            check_transport(settings, url) if url else None
        except InsecureTransport:
            raise ConfigError(settings.source, key,
                              f"would serve plain HTTP on the public address {url}: configure coordinator.tls "
                              "(cert and key), or set coordinator.tls.allow_insecure_http: true") from None


def _token_path(settings: Settings) -> Path:
    return settings.data_dir / IDENTITY_DIR / TOKEN_FILE


MIN_FREE_TO_START = 1024 * 1024


def prepare_node(settings: Settings, address: str | None, token: str | None, wait: float) -> PreparedNode:
    """Identity and mesh token in the data directory; registration with ``address`` if given.

    Raises CliError when the token is missing or refused, or the coordinator cannot be reached.
    """
    check_listeners(settings)
    free = shutil.disk_usage(settings.data_dir).free
    if free < MIN_FREE_TO_START:
        # SQLite, Redis and the logs need a little room; without it they fail with errors that
        # say "disk I/O error" rather than what is wrong.
        raise CliError(f"the data directory {settings.data_dir} is full ({free} bytes free; at least "
                       f"{MIN_FREE_TO_START // 1024 // 1024} MiB are needed to start): free some space")
    identity = load_or_create_identity(settings.data_dir)
    stored = read_token(settings.data_dir)
    if token and stored and token != stored:
        raise CliError(f"the data directory {settings.data_dir} belongs to a mesh with a different token "
                       f"(stored in {_token_path(settings)}); use that token or another data_dir")
    registry = node.open_registry(settings)
    try:
        if address is None:
            generated = not token and not stored
            token = token or stored or generate_token()
            if not stored:
                store_token(settings.data_dir, token)
            node.register_self(settings, identity, registry)
            return PreparedNode(identity, token, generated, None)

        token = token or stored
        if not token:
            raise CliError(f"no mesh token: pass --token TOKEN or set {TOKEN_ENV} "
                           "(the first coordinator printed it, and keeps it in its data_dir/identity/mesh_token)")
        try:
            url = node.coordinator_url(address, settings)
        except node.RegistrationError as exc:
            raise click.BadParameter(str(exc), param_hint="'ADDRESS'") from None
        _check_transport(settings, url)
        from tunnelmesh.peer_client import tls_verify

        deadline = time.monotonic() + wait
        delay = 0.2
        while True:
            try:
                # Signed anew on every attempt: the proof carries a timestamp.
                result = node.register_with(url, token, node.registration_payload(settings, identity),
                                            verify=tls_verify(settings))
                break
            except node.RegistrationError as exc:
                if exc.retryable and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if exc.retryable and stored and registry.get_state(JOINED_VIA_KEY):
                    # This coordinator joined before: it holds its own data and must be able to
                    # restart while the one it joined through is down (no single point of failure).
                    _out(f"warning: {exc}; starting anyway (this coordinator already belongs to the mesh)")
                    node.register_self(settings, identity, registry)
                    return PreparedNode(identity, token, False, None)
                raise CliError(str(exc)) from None
        if not stored:
            store_token(settings.data_dir, token)
        _remember_registration(settings, identity, registry, result)
        return PreparedNode(identity, token, False, url)
    finally:
        registry.close()


def _remember_registration(settings: Settings, identity: NodeIdentity, registry: Any,
                           result: node.RegistrationResult) -> None:
    """Keep what the registrar told us: our mesh IP and name, and the membership view (every
    coordinator of the mesh; their full registry records follow with the first heartbeats)."""
    from storage.membership import MembershipView
    from storage.registry import PeerRecord

    resp = result.response
    name = resp.get("peer_name") or settings.name
    if name != settings.name:
        _out(f"warning: the mesh already has another node named {settings.name!r}; this one is {name!r}")
    registry.upsert(PeerRecord(
        peer_id=identity.peer_id, name=name, public_key=identity.public_key_b64,
        mesh_ip=str(resp.get("mesh_ip", "")), addresses=tuple(node.registration_payload(settings, identity)["addresses"]),
        is_coordinator=True, is_admin=bool(resp.get("is_admin")), api_url=node.api_url(settings),
        s3_url=node.s3_url(settings), version=node.version()))
    try:
        registry.merge_view(MembershipView.from_dict(resp.get("membership")))
    except ValueError as exc:
        raise CliError(f"the coordinator at {result.url} sent an invalid membership view: {exc}") from None
    registry.set_state(JOINED_VIA_KEY, result.url)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(node.version(), "--version", prog_name="tunnelmesh")
def cli() -> None:
    """TunnelMesh coordinator: equal-peer coordinators with replicated S3-compatible storage."""


@cli.command()
@click.argument("address", required=False, metavar="[HOST:PORT]")
@config_option
@click.option("--token", envvar=TOKEN_ENV, metavar="TOKEN",
              help=f"Mesh token (or ${TOKEN_ENV}). Needed to join; generated when bootstrapping without one.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Keep retrying an unreachable coordinator for this long before giving up.")
def join(address: str | None, config: str, token: str | None, wait: float) -> int:
    """Start this coordinator and bootstrap a mesh, or join the one at HOST:PORT.

    \b
    Bootstrap (no address): creates the mesh token if the data directory has none, and prints it
    with the command that joins another coordinator.
    Join: registers this coordinator with the coordinator at HOST:PORT (http(s)://HOST:PORT also
    accepted), then runs its own stack.

    Runs in the foreground until SIGTERM or Ctrl-C: Redis, the coordination API (gunicorn), the
    S3 API (gunicorn), a Celery worker and Celery beat, restarting a child that dies.

    Without coordinator.enabled (a mesh peer), HOST:PORT is required and the peer agent runs
    instead: it registers, keeps the coordinator list in its data directory, sends heartbeats
    and fails over to another healthy coordinator when its coordinator stops answering.
    """
    from tunnelmesh.supervisor import DataDirLock, StartupError, Supervisor, preflight

    token = _check_token(token)
    started = time.monotonic()
    settings = _load(config)
    if address is not None and not settings.coordinator.enabled:
        return _run_peer_agent(settings, address, token, wait)
    lock = DataDirLock(settings)
    try:
        preflight(settings)
        prepared = prepare_node(settings, address, token, wait)
        sup = Supervisor(settings, Path(config))
        sup.install_signal_handlers()
        if prepared.registered_with:
            sup.log(f"registered with the coordinator at {prepared.registered_with}")
        try:
            sup.start()
        except StartupError as exc:
            interrupted = sup.stopping
            sup.stop()
            if interrupted:
                return 0
            raise CliError(f"{settings.name} could not start: {exc}") from None
        except BaseException:
            sup.stop()  # whatever went wrong, leave no process behind
            raise
        _announce(sup, settings, prepared, time.monotonic() - started)
        return sup.run()
    finally:
        lock.release()


def _run_peer_agent(settings: Settings, address: str, token: str | None, wait: float) -> int:
    """``join`` on a node without coordinator mode: the peer agent, in the foreground."""
    from tunnelmesh.peer_agent import PeerAgent
    from tunnelmesh.supervisor import DataDirLock

    token = token or read_token(settings.data_dir)
    if not token:
        raise CliError(f"no mesh token: pass --token TOKEN or set {TOKEN_ENV}")
    try:
        url = node.coordinator_url(address, settings)
    except node.RegistrationError as exc:
        raise click.BadParameter(str(exc), param_hint="'ADDRESS'") from None
    _check_transport(settings, url)
    lock = DataDirLock(settings)
    try:
        identity = load_or_create_identity(settings.data_dir)
        if read_token(settings.data_dir) is None:
            store_token(settings.data_dir, token)  # needed to re-register elsewhere on failover
        agent = PeerAgent(settings, token, identity=identity, log=lambda m: _out(f"[peer] {m}"))
        agent.install_signal_handlers()
        deadline = time.monotonic() + wait
        while True:
            try:
                return agent.run(url)
            except node.RegistrationError as exc:
                if exc.retryable and time.monotonic() + 0.5 < deadline:
                    time.sleep(0.5)
                    continue
                raise CliError(str(exc)) from None
    finally:
        lock.release()


def drain_before_leave(settings: Settings) -> dict[str, Any]:
    """Hand this coordinator's chunks to their holders without it (issue 6), showing progress;
    returns the drain report once every new holder has confirmed every chunk."""
    from tunnelmesh.rebalance import drain

    tty = sys.stdout.isatty()

    def show(progress: dict[str, Any]) -> None:
        moved, remaining = progress.get("moved_bytes", 0), progress.get("remaining_bytes", 0)
        line = (f"draining: {moved / 1e6:.1f} MB moved, {remaining / 1e6:.1f} MB "
                f"({progress.get('remaining_chunks', 0)} chunks) remaining")
        if tty:
            sys.stdout.write("\r" + line.ljust(shutil.get_terminal_size().columns - 1))
            sys.stdout.flush()
        else:
            _out(line)

    report = drain(settings, show)
    if tty:
        sys.stdout.write("\n")
    return report


def stop_running_coordinator(settings: Settings, timeout: float = 60.0) -> bool:
    """SIGTERM this data directory's running supervisor (if any) and wait; True if one stopped."""
    from tunnelmesh.supervisor import read_state

    state = read_state(settings) or {}
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # A zombie has stopped too: its parent (a shell, a test) reaps it later.
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    raise CliError(f"the coordinator (pid {pid}) did not stop within {timeout:.0f}s")


def _status_lines(status: dict[str, Any]) -> list[str]:
    lines = [f"{status['name']} ({status['role']}, peer ID {status['peer_id']})"]
    if status.get("mesh_ip"):
        lines[0] += f", mesh IP {status['mesh_ip']}"
    using = status.get("using") or {}
    lines.append(f"membership version {status.get('membership_version')}; using coordinator "
                 f"{using.get('name', '-')} ({using.get('api_url', '-')})")
    for c in status.get("coordinators", []):
        mark = "*" if c.get("peer_id") == using.get("peer_id") else " "
        health = "up" if c.get("healthy") else "DOWN"
        lines.append(f" {mark} {c.get('name', '?'):<24} {c.get('peer_id', '?')}  {c.get('mesh_ip', '?'):<15} "
                     f"{health:<4} {c.get('api_url', '')}")
    return lines


def node_status(settings: Settings) -> dict[str, Any]:
    """What `tunnelmesh status` reports, from local state only (works while others are down)."""
    identity = load_or_create_identity(settings.data_dir)
    if not settings.coordinator.enabled:
        from tunnelmesh.peer_agent import read_state, state_path

        state = read_state(settings)
        if state is None:
            raise CliError(f"this peer has not registered yet ({state_path(settings)} is missing): "
                           "run 'tunnelmesh join HOST:PORT --token T' first")
        return {"role": "peer", "name": state.get("peer_name") or settings.name, "peer_id": identity.peer_id,
                "mesh_ip": state.get("mesh_ip"), "membership_version": state.get("membership_version"),
                "membership_digest": state.get("membership_digest"), "using": state.get("coordinator"),
                "coordinators": state.get("coordinators", []), "updated_at": state.get("updated_at"),
                "last_heartbeat_ok": state.get("last_heartbeat_ok")}
    registry = node.open_registry(settings)
    try:
        view = registry.load_view()
        me = registry.get(identity.peer_id)
        return {"role": "coordinator", "name": me.name if me else settings.name, "peer_id": identity.peer_id,
                "mesh_ip": me.mesh_ip if me else None, "membership_version": view.version,
                "membership_digest": view.digest(), "member": view.is_active(identity.peer_id),
                "using": {"peer_id": identity.peer_id, "name": me.name if me else settings.name,
                          "api_url": node.api_url(settings)},
                "coordinators": node.coordinator_list(settings, registry, identity.peer_id, view)}
    finally:
        registry.close()


def _announce(sup: Any, settings: Settings, prepared: PreparedNode, elapsed: float) -> None:
    s3 = f", S3 {node.s3_url(settings)}" if settings.s3.enabled else ""
    sup.log(f"{settings.name} is ready in {elapsed:.1f}s: coordination API {node.api_url(settings)}{s3} "
            f"(peer ID {prepared.identity.peer_id})")
    if prepared.registered_with:
        return
    if prepared.token_generated:
        sup.log(f"New mesh created. Mesh token (keep it secret; stored in {_token_path(settings)}):")
        sup.log(f"  {prepared.token}")
        token_arg = prepared.token
    else:
        token_arg = f'"$(cat {_token_path(settings)})"'
    sup.log("Join another coordinator with:")
    sup.log(f"  tunnelmesh join {node.join_address(settings)} --token {token_arg} --config coordinator-b.yaml")


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.option("--watch", is_flag=True, help="Redraw rebalance progress every second until Ctrl-C.")
def status(config: str, as_json: bool, watch: bool) -> int:
    """Show the coordinator list with health, the membership version, the coordinator in use, and
    (on a coordinator) rebalance progress: bytes moved and remaining per coordinator."""
    settings = _load(config)
    info = node_status(settings)
    if info["role"] == "coordinator":
        from tunnelmesh.rebalance import format_progress, rebalance_progress

        def progress() -> dict[str, Any]:
            try:
                return rebalance_progress(settings)
            except Exception as exc:  # noqa: BLE001 - status must work while the stack is down
                return {settings.name: {"state": f"unknown ({type(exc).__name__})"}}

        if watch and not as_json:
            try:
                while True:
                    width = shutil.get_terminal_size().columns
                    click.clear()
                    _out("\n".join(_status_lines(info)))
                    _out("\nrebalance:")
                    _out(format_progress(progress(), width))
                    time.sleep(1.0)
                    info = node_status(settings)
            except KeyboardInterrupt:
                return 0
        info["rebalance"] = progress()
    if as_json:
        _out(json.dumps(info))
    else:
        for line in _status_lines(info):
            _out(line)
        if "rebalance" in info:
            _out("rebalance:")
            _out(format_progress(info["rebalance"], shutil.get_terminal_size().columns))
    return 0


@cli.command()
@config_option
@click.option("--once", is_flag=True, help="Run one manifest-sync round now and report what it did.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def sync(config: str, once: bool, as_json: bool) -> int:
    """The safety-net manifest sync. It runs by itself every sync.interval (5 minutes by default);
    --once runs one round now against every other coordinator."""
    from tunnelmesh.sync import run_sync_once

    settings = _load(config)
    if not settings.coordinator.enabled:
        raise CliError("only a coordinator runs the manifest sync (coordinator.enabled is false)")
    if not once:
        raise CliError(f"the sync runs by itself every {settings.sync.interval:g}s in the coordinator's "
                       "beat; use --once to run one round now")
    report = run_sync_once(settings, lock_timeout=30.0)
    if as_json:
        _out(json.dumps(report))
    elif "skipped" in report:
        _out(f"skipped: {report['skipped']}")
    else:
        for r in report.get("rounds", []):
            _out(f"{r['peer']} ({r['mode']}): {r['outcome']}; ranges differing {r['ranges_differing']}/"
                 f"{r['ranges_compared']}, deleted on peer {r['deleted_on_peer']}, sent {r['sent_to_peer']}, "
                 f"pulled {r['pulled']}, {r['bytes_sent'] + r['bytes_received']} bytes exchanged"
                 + (f", error: {r['error']}" if r.get("error") else ""))
        _out(f"tombstones purged: {report.get('purged', 0)}; took {report.get('seconds', 0):.2f}s")
    return 0


@cli.command()
@config_option
def leave(config: str) -> int:
    """Remove this coordinator from the mesh (admin operation; the others are told at once).

    The coordinator stays a member while it is merely down; `leave` is how it goes for good. The
    removal is sent, signed by this node, to every other member (any one suffices: membership
    spreads between coordinators), and recorded in this node's own view.
    """
    from tunnelmesh import cluster

    settings = _load(config)
    if not settings.coordinator.enabled:
        raise CliError("only a coordinator leaves the membership (coordinator.enabled is false)")
    identity = load_or_create_identity(settings.data_dir)
    registry = node.shared_registry(settings)
    if not registry.load_view().is_active(identity.peer_id):
        _out(f"{settings.name} is not an active member of the mesh; nothing to do")
        return 0
    others = [m for m in registry.load_view().active_members() if m.peer_id != identity.peer_id]
    if others:
        try:
            report = drain_before_leave(settings)
        except TimeoutError as exc:
            raise CliError(f"draining did not finish ({exc}); this coordinator is still a member") from None
        _out(f"drained: {report.get('moved_bytes', 0) / 1e6:.1f} MB moved; "
             "every chunk confirmed by its new holders")
    accepted = cluster.broadcast_removal(settings, identity, identity.peer_id)
    if others and not accepted:
        raise CliError("no other coordinator accepted the removal (none reachable?); nothing was changed")
    view, _ = node.remove_coordinator(registry, identity.peer_id, identity.peer_id)
    _out(f"{settings.name} left the mesh (membership version {view.version}; accepted by "
         f"{', '.join(accepted) or 'nobody: it was the only coordinator'})")
    if stop_running_coordinator(settings):
        _out(f"{settings.name} stopped")
    return 0


@cli.command("id")
@config_option
def show_id(config: str) -> int:
    """Print this node's peer ID (creating its identity on first use), e.g. for admin_peers."""
    settings = _load(config)
    _out(load_or_create_identity(settings.data_dir).peer_id)
    return 0


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the credentials as one JSON object.")
def credentials(config: str, as_json: bool) -> int:
    """Print this node's S3 access key and secret, with aws CLI and boto3 snippets."""
    settings = _load(config)
    token = read_token(settings.data_dir)
    if token is None:
        raise CliError(f"this node has no mesh token yet ({_token_path(settings)} is missing): "
                       "start it once with 'tunnelmesh join'")
    peer_id = load_or_create_identity(settings.data_dir).peer_id
    creds = s3_credentials(token, peer_id)
    endpoint = node.s3_url(settings)
    region = settings.s3.region
    if as_json:
        _out(json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key,
                         "endpoint": endpoint, "region": region, "peer_id": peer_id}))
        return 0
    profile = settings.name
    _out(f"Access key ID:     {creds.access_key}")
    _out(f"Secret access key: {creds.secret_key}")
    _out(f"S3 endpoint:       {endpoint or '(s3.enabled is false)'}")
    _out(f"Region:            {region}")
    _out()
    _out("# AWS CLI")
    _out(f"aws configure set aws_access_key_id {creds.access_key} --profile {profile}")
    _out(f"aws configure set aws_secret_access_key {creds.secret_key} --profile {profile}")
    _out(f"aws configure set region {region} --profile {profile}")
    _out(f"aws configure set s3.addressing_style path --profile {profile}")
    _out(f"aws --profile {profile} --endpoint-url {endpoint} s3 ls")
    _out()
    _out("# Python (boto3)")
    _out("import boto3")
    _out("from botocore.config import Config")
    _out(f's3 = boto3.client("s3", endpoint_url="{endpoint}", region_name="{region}",')
    _out(f'                  aws_access_key_id="{creds.access_key}",')
    _out(f'                  aws_secret_access_key="{creds.secret_key}",')
    _out('                  config=Config(s3={"addressing_style": "path"}))')
    return 0


@cli.command()
@click.argument("role", type=click.Choice(["web", "s3", "worker", "beat", "flower", "redis"]))
@click.argument("address", required=False, metavar="[HOST:PORT]")
@config_option
@click.option("--token", envvar=TOKEN_ENV, metavar="TOKEN", help=f"Mesh token (or ${TOKEN_ENV}); web only.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="web only: keep retrying an unreachable coordinator for this long.")
@click.option("--print", "print_only", is_flag=True, help="Print the command instead of running it.")
def run(role: str, address: str | None, config: str, token: str | None, wait: float, print_only: bool) -> int:
    """Run one process of this coordinator in the foreground (containers; no supervision).

    \b
    web prepares the node first, as `join` does: identity, mesh token (from --token, the data
    directory, or a new one), and registration with the coordinator at HOST:PORT if given.
    The other roles expect web to have done that (docker compose starts them after web).
    """
    from tunnelmesh import redis_server
    from tunnelmesh.supervisor import child_env, role_argv, run_dir

    token = _check_token(token)
    settings = _load(config)
    config_path = Path(config).resolve()  # before the chdir below
    argv = role_argv(role, settings)
    if print_only:
        _out(" ".join(argv))
        return 0
    if role == "web":
        prepared = prepare_node(settings, address, token, wait)
        if prepared.token_generated:
            _out(f"New mesh created. Mesh token (stored in {_token_path(settings)}): {prepared.token}")
    if role == "redis":
        redis_server.write_config(settings)
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir(settings))
    sys.stdout.flush()
    env = child_env(settings, config_path, role)
    os.execve(argv[0], argv, env)
    return 0  # not reached


# ---------------------------------------------------------------------------------------------
# Entry point: every error as one line, never a traceback
# ---------------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``tunnelmesh = tunnelmesh.cli:main``)."""
    try:
        result = cli.main(args=argv, prog_name="tunnelmesh", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail("aborted", 130)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except CliError as exc:
        _fail(str(exc), 1)
    except InsufficientStorage as exc:
        _fail(f"the data directory is full: {exc}", 1)
    except StorageError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the promise is: no traceback, one clear line
        if os.environ.get("TUNNELMESH_DEBUG"):
            traceback.print_exc()
        _fail(f"unexpected {type(exc).__name__}: {exc} (set TUNNELMESH_DEBUG=1 for a traceback)", 1)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()

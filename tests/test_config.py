"""Settings: validated at start; a bad value stops the peer with a message naming the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peer.dejima.config import ConfigError, load_config, parse_seeds, secret_key
from tests.helpers import start_peer_process

GOOD = {
    "PEER_TYPE": "bank",
    "DEJIMA_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/bank",
    "DEJIMA_CLIENT_DATABASE_URL": "postgresql://bank_client@127.0.0.1:5432/bank",
    "DEJIMA_SECRET_KEY": "a-test-secret-that-is-not-a-default",
}


@pytest.mark.unit
def test_it_reads_defaults_for_a_minimal_peer() -> None:
    config = load_config(GOOD)
    assert (config.name, config.mode, config.peer_timeout, config.commit_wait) == ("bank", "peer", 5.0, "decision")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("PEER_TYPE", "bakery"),
        ("PEER_MODE", "admin"),
        ("DEJIMA_PEER_NAME", "Bad Name"),
        ("DEJIMA_URL", "ftp://x"),
        ("DEJIMA_DATABASE_URL", "mysql://x/y"),
        ("DEJIMA_PEER_TIMEOUT", "soon"),
        ("DEJIMA_TXN_TIMEOUT", "-1"),
        ("DEJIMA_LOCK_TIMEOUT_MS", "1.5"),
        ("DEJIMA_COMMIT_WAIT", "never"),
        ("DEJIMA_SEEDS", "dejima_bank=not-a-url"),
        ("DEJIMA_MAX_BODY_BYTES", "10"),
    ],
)
def test_it_rejects_a_bad_value_naming_the_setting(setting: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({**GOOD, setting: value})
    assert err.value.setting == setting
    assert str(err.value).startswith(f"{setting}: ")


@pytest.mark.unit
def test_it_requires_a_peer_type() -> None:
    with pytest.raises(ConfigError, match=r"^PEER_TYPE: is required"):
        load_config({"DEJIMA_DATABASE_URL": GOOD["DEJIMA_DATABASE_URL"]})


@pytest.mark.unit
def test_it_parses_seeds_per_view_and_for_every_view() -> None:
    seeds = parse_seeds("DEJIMA_SEEDS", "dejima_bank=http://a:1,http://b:2; http://c:3")
    assert seeds == {"dejima_bank": ("http://a:1", "http://b:2"), "*": ("http://c:3",)}


@pytest.mark.integration
def test_it_refuses_to_start_a_peer_with_a_bad_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEJIMA_", "PEER_"))}
    env.update({**GOOD, "DEJIMA_PEER_TIMEOUT": "soon", "DEJIMA_BIND": "127.0.0.1:0"})
    done = start_peer_process(env)
    assert done.returncode != 0
    assert "DEJIMA_PEER_TIMEOUT: 'soon' is not a number" in done.stderr


@pytest.mark.unit
@pytest.mark.parametrize("secret", ["", "  ", "dev-only-not-secret", "changeme", "django-insecure-abc"])
@pytest.mark.parametrize("mode", ["peer", "client"])
def test_outside_debug_it_refuses_an_empty_or_default_secret_key(secret: str, mode: str) -> None:
    env = {**GOOD, "DEJIMA_SECRET_KEY": secret, "PEER_MODE": mode, "DEJIMA_PEER_URL": "http://127.0.0.1:8001"}
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert err.value.setting == "DEJIMA_SECRET_KEY"
    assert "DEJIMA_DEBUG=1" in str(err.value)
    assert secret_key({**env, "DEJIMA_DEBUG": "1"})  # debug: the development default is accepted


@pytest.mark.unit
def test_the_secret_key_may_come_from_a_file_and_is_checked_there_too(tmp_path: Path) -> None:
    env = {k: v for k, v in GOOD.items() if k != "DEJIMA_SECRET_KEY"}
    path = tmp_path / "secret"
    path.write_text("a-long-random-secret-from-a-docker-secret\n")
    assert secret_key({**env, "DEJIMA_SECRET_KEY_FILE": str(path)}) == "a-long-random-secret-from-a-docker-secret"
    path.write_text("\n")
    with pytest.raises(ConfigError, match=r"^DEJIMA_SECRET_KEY_FILE: is empty"):
        load_config({**env, "DEJIMA_SECRET_KEY_FILE": str(path)})
    with pytest.raises(ConfigError, match=r"^DEJIMA_SECRET_KEY_FILE: cannot read"):
        load_config({**env, "DEJIMA_SECRET_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"^DEJIMA_SECRET_KEY_FILE: give the secret once"):
        load_config({**GOOD, "DEJIMA_SECRET_KEY_FILE": str(path)})


@pytest.mark.integration
def test_it_refuses_to_start_a_peer_without_a_secret_key_outside_debug() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEJIMA_", "PEER_"))}
    env.update({k: v for k, v in GOOD.items() if k != "DEJIMA_SECRET_KEY"})
    env["DEJIMA_BIND"] = "127.0.0.1:0"
    done = start_peer_process(env)
    assert done.returncode != 0
    assert "DEJIMA_SECRET_KEY: is empty" in done.stderr

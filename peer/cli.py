"""The `dejima` command: the user's handle on a local Dejima network.

`up` starts PostgreSQL and the example peers (government, bank, insurance) on loopback; `down` stops them;
`status`, `exec`, `query` and `check` talk to running peers over their REST API; `bench` runs benchmarks;
`chaos` runs its own network under injected faults and checks the history (peer/chaos.py).

State: `.dejima/` of the checkout, unless `--state-dir DIR`: PostgreSQL's folder `<state dir>/pg` and the network's
folder `<state dir>/network` (network.json with the peers' pids, logs, keys, API tokens; `--network DIR` names
another). `up --free-ports` runs the peers on free loopback ports instead of 8001-8003 (beside another network).

Every call to a peer's API carries the peer's API token (`Authorization: Bearer …`): the one the kit made in
`<network dir>/<peer>.token`, for a peer given by name or by a URL of a peer of that network; for another URL,
DEJIMA_PEER_TOKEN or DEJIMA_PEER_TOKEN_FILE when set.

Every call verifies the peer's certificate (TLS, peer.dejima.tls): against the kit's CA for a peer of the network
(peer.tlscerts.kit_ca, `.dejima/ca/ca.pem`), against DEJIMA_TLS_CA_FILE (else the system's CAs) for another URL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from peer.dejima import txlog
from peer.dejima.config import ConfigError, peer_token
from peer.dejima.install import InstallError
from peer.dejima.manifest import ManifestError
from peer.network import CLIENT_USER, LocalNetwork, NetworkError, example_specs
from peer.pgserver import PgServer, PgServerError

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = REPO_ROOT / ".dejima"
HTTP_TIMEOUT = 30.0


class CliError(Exception):
    pass


def _state_dir(args: argparse.Namespace) -> Path:
    state: Path | None = getattr(args, "state_dir", None)
    return state if state is not None else STATE_DIR


def _network_dir(args: argparse.Namespace) -> Path:
    network: Path | None = getattr(args, "network", None)
    return network if network is not None else _state_dir(args) / "network"


def _server(args: argparse.Namespace) -> PgServer:
    return PgServer.from_env(_state_dir(args) / "pg")


def _network(args: argparse.Namespace) -> LocalNetwork:
    return LocalNetwork.load(_server(args), _network_dir(args))


def _headers(net: LocalNetwork, name: str) -> dict[str, str]:
    """The kit's API token of a peer of the network, as a header."""
    if not net.token_path(name).exists():
        raise CliError(f"no API token for {name} in {net.token_path(name)}: start it with `dejima up`")
    return net.auth_headers(name)


def url_headers(net: LocalNetwork, url: str) -> dict[str, str]:
    """The API token for a peer given by URL: the kit's, when it is a peer of the network; else DEJIMA_PEER_TOKEN
    or DEJIMA_PEER_TOKEN_FILE; else none (the peer will answer 401)."""
    peer = net.peer_at(url)
    if peer is not None:
        return _headers(net, peer)
    try:
        token = peer_token({**os.environ, "DEJIMA_DEBUG": "1"})  # validated; "" when neither is set
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    return {"Authorization": f"Bearer {token}"} if token else {}


Verify = str | bool  # what `requests` verifies a certificate against: a CA file, or True (the system's CAs)
Target = tuple[str, dict[str, str] | None, Verify]  # a peer's API: URL, headers (its token), Verify


def url_verify(net: LocalNetwork, url: str) -> Verify:
    """What a peer's certificate is verified against: the kit's CA for a peer of the network, else the CA of
    DEJIMA_TLS_CA_FILE when set, else the system's CAs."""
    if net.peer_at(url) is not None:
        return net.verify
    return os.environ.get("DEJIMA_TLS_CA_FILE", "").strip() or True


def _target(net: LocalNetwork, peer: str) -> tuple[str, dict[str, str], Verify]:
    """(URL, headers, what its certificate is verified against) of a peer given by name or URL."""
    if peer.startswith(("http://", "https://")):
        return peer.rstrip("/"), url_headers(net, peer), url_verify(net, peer)
    if peer not in net.specs or net.specs[peer].mode != "peer":
        known = ", ".join(n for n, s in net.specs.items() if s.mode == "peer") or "none (run `dejima up`)"
        raise CliError(f"unknown peer {peer!r}; known peers: {known}")
    return net.specs[peer].url, _headers(net, peer), net.verify


def _api(
    url: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    verify: Verify = True,
) -> tuple[int, Any]:
    try:
        if body is None:
            resp = requests.get(url + path, headers=headers, timeout=HTTP_TIMEOUT, verify=verify)
        else:
            resp = requests.post(url + path, json=body, headers=headers, timeout=HTTP_TIMEOUT, verify=verify)
    except requests.RequestException as exc:
        raise CliError(f"{url} is unreachable: {exc}") from None
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, {"error": resp.text[:500]}


def cmd_up(args: argparse.Namespace) -> int:
    server = _server(args)
    server.start()
    net = _network(args)
    if not net.specs:
        specs = example_specs(base_port=0 if args.free_ports else None, clients=True)
        net = LocalNetwork(server, _network_dir(args), specs)
    for name, spec in net.specs.items():
        if not spec.pid:
            net.start(name)
    try:
        net.wait_ready(timeout=60)
    except NetworkError as exc:
        raise CliError(str(exc)) from None
    print(f"PostgreSQL ({server.kind}): {server.url('postgres')}")
    for spec in net.specs.values():
        where = (
            f"database {server.url(spec.database)}; API token in {net.token_path(spec.name)}"
            if spec.mode == "peer"
            else f"web app; login {CLIENT_USER}, password in {net.password_path(spec.name)}"
        )
        print(f"  {spec.name:<18} {spec.mode:<6} {spec.url:<24} {where}")
    print("\nTry:")
    print(
        '  dejima exec government "INSERT INTO government_users (first_name, last_name, phone, address)'
        " VALUES ('Jane', 'Roe', '555-0199', '2 Elm St')\""
    )
    print('  dejima query bank "TABLE bank_users"')
    print("  dejima check")
    first = next((s for s in net.specs.values() if s.mode == "peer"), None)
    if first is not None:
        cacert = f"--cacert {net.verify} " if first.tls else ""
        print(
            f'  curl {cacert}-H "Authorization: Bearer $(cat {net.token_path(first.name)})" {first.url}/api/v1/status'
        )
    if any(s.tls for s in net.specs.values()):
        print(f"TLS: every URL above is https, certificates of the kit's CA {net.verify} (trust it to browse).")
    print(f"Logs: {net.state_dir}/<peer>.log. Stop everything with `dejima down` (or `make down`).")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    net = _network(args)
    net.stop_all()
    (net.state_dir / "network.json").unlink(missing_ok=True)
    server = _server(args)
    server.stop()
    print("stopped peers and PostgreSQL" if server.kind != "external" else "stopped peers")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    net = _network(args)
    if not net.specs:
        raise CliError(f"no peers known in {net.state_dir}; run `dejima up`")
    out: dict[str, Any] = {}
    healthy = True
    for name, spec in net.specs.items():
        try:
            _, health = _api(spec.url, "/health", verify=net.verify)
            status: dict[str, Any] = {}
            if spec.mode == "peer":  # (a client's pages need a login, not a token: its health says enough)
                code, status = _api(spec.url, "/api/v1/status", headers=_headers(net, name), verify=net.verify)
                if code != 200:
                    raise CliError(f"status: {code} {status.get('error', status)}")
            out[name] = {
                "url": spec.url,
                "health": health.get("status"),
                "groups": status.get("groups"),
                "peer_groups": status.get("peer_groups"),
                "peers": status.get("peers"),
            }
            healthy = healthy and health.get("status") == "ok"
        except CliError as exc:
            out[name] = {"url": spec.url, "health": "unreachable", "error": str(exc)}
            healthy = False
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, info in out.items():
            print(f"{name:<11} {info['url']:<24} {info['health']}")
            for view, members in (info.get("groups") or {}).items():
                print(f"    {view:<18} {', '.join(members)}")
    return 0 if healthy else 1


def cmd_exec(args: argparse.Namespace) -> int:
    url, headers, verify = _target(_network(args), args.peer)
    status, body = _api(url, "/api/v1/exec", {"sql": args.sql}, headers, verify)
    if status == 200 and body.get("status") == "committed":
        reached = ", ".join(body.get("participants") or []) or "no other peer"
        print(f"committed {body.get('gxid')} (reached {reached})")
        return 0
    print(f"aborted ({status} {body.get('kind', '')}): {body.get('error', body)}", file=sys.stderr)
    return 3 if status == 409 else 1


def cmd_query(args: argparse.Namespace) -> int:
    url, headers, verify = _target(_network(args), args.peer)
    status, body = _api(url, "/api/v1/query", {"sql": args.sql}, headers, verify)
    if status != 200:
        print(f"error ({status}): {body.get('error', body)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, default=str))
        return 0
    print(" | ".join(body["columns"]))
    for row in body["rows"]:
        print(" | ".join("NULL" if v is None else str(v) for v in row))
    return 0


def check_network(
    urls: dict[str, str], auth: Mapping[str, dict[str, str]] | None = None, verify: Mapping[str, Verify] | Verify = True
) -> dict[str, Any]:
    """Compare every dejima view across its group; verify every peer's transaction log (hash chain) and compare it
    with what its partners' logs recorded of it; list leftover prepared transactions; report every peer whose
    machinery in the database (capture and putback triggers, their functions, privileges) is not what its manifest
    generates (GET /api/v1/machinery). `auth` gives the headers (the API token) for each key of `urls`; `verify` what
    their certificates are verified against (one for all, or by key).

    A view's digest (GET /api/v1/views/<view>) is order-independent: the sha256 of the sorted canonical JSON lines of
    its rows, so peers agree whatever their physical row order. A chain is verified by its peer (GET
    /api/v1/txlog?verify=1 recomputes every hash in its database); `broken_at` is the first seq that does not verify.
    A chain that verifies by itself is then compared with what the other peers' chains recorded of it
    (`txlog.cross_check`): its newest entries deleted, or entries rewritten with their hashes recomputed, show there,
    `broken_at` naming the first seq found damaged.
    """
    views: dict[str, dict[str, str]] = {}
    prepared: dict[str, list[Any]] = {}
    chains: dict[str, dict[str, Any]] = {}
    reports: dict[str, txlog.ChainReport] = {}
    where: dict[str, Target] = {}  # peer name -> (URL, headers, what its certificate is verified against)
    machinery: dict[str, list[str]] = {}  # peer -> what differs in its database (its capture triggers, …)
    errors: list[str] = []
    for name, url in urls.items():
        headers = (auth or {}).get(name)
        ca = verify.get(name, True) if isinstance(verify, Mapping) else verify
        try:
            code, status = _api(url, "/api/v1/status", headers=headers, verify=ca)
            if code != 200:
                raise CliError(f"status unavailable ({code}): {status.get('error', status)}")
            for view in status.get("views", []):
                _, snap = _api(url, f"/api/v1/views/{view}", headers=headers, verify=ca)
                views.setdefault(view, {})[name] = snap["digest"]
            code, log = _api(url, "/api/v1/txlog?verify=1&limit=0", headers=headers, verify=ca)
            if code != 200 or "verify" not in log:
                raise CliError(f"transaction log unavailable ({code}): {log.get('error', log)}")
            verdict = log["verify"]
            peer = str(status.get("peer") or name)  # by peer name, also when checked by URL
            chains[peer] = {
                "ok": bool(verdict["ok"]),
                "length": verdict["length"] if verdict["ok"] else log.get("length"),
                "broken_at": verdict["broken_at"],
                "reason": verdict.get("reason", ""),
            }
            where[peer] = (url, headers, ca)
            reports[peer] = txlog.ChainReport(
                bool(verdict["ok"]),
                int(verdict["length"]),
                dict(log.get("witnessed") or {}),
                dict(log.get("witnessed_by") or {}),
            )
            _, prep = _api(url, "/api/v1/prepared", headers=headers, verify=ca)
            prepared[name] = prep.get("prepared", [])
            code, inspected = _api(url, "/api/v1/machinery", headers=headers, verify=ca)
            if code != 200 or "problems" not in inspected:
                raise CliError(f"machinery unavailable ({code}): {inspected.get('error', inspected)}")
            machinery[str(status.get("peer") or name)] = list(inspected["problems"])
        except (CliError, KeyError) as exc:
            errors.append(f"{name}: {exc}")
    try:
        damaged_chains = txlog.cross_check(
            reports, lambda p, seqs: _hashes(where[p], seqs), lambda p, o: _pair(where[p], o)
        )
    except (CliError, KeyError, ValueError) as exc:
        errors.append(f"comparing the logs: {exc}")
        damaged_chains = {}
    for peer, (seq, why) in damaged_chains.items():
        chains[peer] = {**chains[peer], "ok": False, "broken_at": seq, "reason": why}
    divergent = sorted(v for v, digests in views.items() if len(set(digests.values())) > 1)
    broken = sorted(name for name, chain in chains.items() if not chain["ok"])
    # several peers may share one PostgreSQL cluster: count each prepared transaction once
    leftover = sorted({p["gid"] for items in prepared.values() for p in items})
    damaged = sorted(name for name, problems in machinery.items() if problems)
    return {
        "ok": not divergent and not leftover and not errors and not broken and not damaged,
        "views": {v: {"identical": v not in divergent, "digests": d} for v, d in sorted(views.items())},
        "divergent_views": divergent,
        "chains": chains,
        "broken_chains": broken,
        "prepared_transactions": leftover,
        "machinery": machinery,
        "damaged_machinery": damaged,
        "errors": errors,
    }


def _hashes(target: Target, seqs: list[int]) -> dict[int, str | None]:
    """The hashes of a peer's entries at `seqs` (GET /api/v1/txlog?at=…)."""
    url, headers, ca = target
    out: dict[int, str | None] = {}
    wanted = sorted(set(seqs))
    for i in range(0, len(wanted), 100):
        part = ",".join(str(seq) for seq in wanted[i : i + 100])
        code, body = _api(url, f"/api/v1/txlog?limit=0&at={part}", headers=headers, verify=ca)
        if code != 200 or "at" not in body:
            raise CliError(f"{url}: hashes unavailable ({code}): {body.get('error', body)}")
        out.update({int(seq): h for seq, h in body["at"].items()})
    return out


def _pair(target: Target, partner: str) -> dict[str, Any]:
    """What a peer's chain holds about `partner`'s entries and owes it, item by item (GET /api/v1/txlog?pair=…)."""
    url, headers, ca = target
    code, body = _api(url, f"/api/v1/txlog?limit=0&verify=1&pair={quote(partner)}", headers=headers, verify=ca)
    if code != 200 or "pair" not in body:
        raise CliError(f"{url}: the log's items for {partner} unavailable ({code}): {body.get('error', body)}")
    pair: dict[str, Any] = body["pair"]
    return pair


def cmd_check(args: argparse.Namespace) -> int:
    net = _network(args)
    if args.peer:
        urls = {url: url.rstrip("/") for url in args.peer}
        auth = {url: url_headers(net, url) for url in args.peer}
        verify = {url: url_verify(net, url) for url in args.peer}
    else:
        urls = {name: spec.url for name, spec in net.specs.items() if spec.mode == "peer"}
        auth = {name: _headers(net, name) for name in urls}
        verify = dict.fromkeys(urls, net.verify)
    if not urls:
        raise CliError(f"no peers known in {net.state_dir}; run `dejima up`")
    report = check_network(urls, auth, verify)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for view, info in report["views"].items():
            print(f"{view:<18} {'identical' if info['identical'] else 'DIVERGENT'} across {', '.join(info['digests'])}")
        for peer, chain in report["chains"].items():
            if chain["ok"]:
                print(f"txlog {peer:<12} ok ({chain['length']} entries)")
            else:
                print(f"txlog {peer:<12} BROKEN at seq {chain['broken_at']}: {chain['reason']}")
        for gid in report["prepared_transactions"]:
            print(f"leftover prepared transaction {gid}")
        for peer, problems in report["machinery"].items():
            for problem in problems:
                print(f"machinery {peer:<12} {problem}")
        for err in report["errors"]:
            print(f"error: {err}")
        print("ok" if report["ok"] else "NOT OK")
    return 0 if report["ok"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from peer.bench import main as bench_main

    rest = list(args.bench_args)
    return bench_main(rest[1:] if rest[:1] == ["--"] else rest)


def cmd_chaos(args: argparse.Namespace) -> int:
    from peer import chaos

    rest = list(args.chaos_args)
    return chaos.main(rest[1:] if rest[:1] == ["--"] else rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dejima", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the kit's state folder: PostgreSQL in DIR/pg, the network in DIR/network (default: .dejima)",
    )
    parser.add_argument(
        "--network",
        type=Path,
        default=None,
        metavar="DIR",
        help="the local network's folder: network.json, logs, API tokens (default: <state dir>/network)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL and the example peers; return when ready")
    up.add_argument("--detach", action="store_true", help="return once ready (always: peers run in the background)")
    up.add_argument(
        "--free-ports", action="store_true", help="free loopback ports instead of 8001-8003 (beside another network)"
    )
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="peers, health, groups")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    exe = sub.add_parser("exec", help="run SQL statements at a peer as one global transaction")
    exe.add_argument("peer", help="peer name (from `dejima up`) or URL")
    exe.add_argument("sql")
    exe.set_defaults(func=cmd_exec)
    qry = sub.add_parser("query", help="run one read-only query at a peer")
    qry.add_argument("peer")
    qry.add_argument("sql")
    qry.add_argument("--json", action="store_true")
    qry.set_defaults(func=cmd_query)
    chk = sub.add_parser(
        "check",
        help="compare every dejima view across its group, verify every transaction log; list leftover prepared txns",
    )
    chk.add_argument("--json", action="store_true")
    chk.add_argument("--peer", action="append", metavar="URL", help="check these peers (default: `dejima up`'s)")
    chk.set_defaults(func=cmd_check)
    bench = sub.add_parser(
        "bench",
        help="benchmarks: capture, propagation, throughput, ycsb, discovery, fanout, all; see `dejima bench --help`",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    chaos = sub.add_parser(
        "chaos",
        help="random global transactions under injected faults, checked; see `dejima chaos --help`",
        add_help=False,
    )
    chaos.add_argument("chaos_args", nargs=argparse.REMAINDER)
    chaos.set_defaults(func=cmd_chaos)
    return parser


PASS_THROUGH = ("bench", "chaos")  # the commands that parse their own options


def pass_through(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with `--` after `bench` or `chaos` (after `dejima`'s own options, e.g. `--state-dir DIR`), unless one
    is there already: those commands parse their own options, and argparse's REMAINDER would take `--json` or
    `--trials 3` right after the command for an unknown option of `dejima`'s."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        i += 2 if argv[i] in takes_value else 1
    if i < len(argv) and argv[i] in PASS_THROUGH and argv[i + 1 : i + 2] != ["--"]:
        return [*argv[: i + 1], "--", *argv[i + 1 :]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(pass_through(parser, argv))
    try:
        code: int = args.func(args)
    except (CliError, PgServerError, InstallError, ManifestError, NetworkError) as exc:
        print(f"dejima: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Generated peer types for the benchmarks: random trees (ycsb) and stars (fanout), written as manifests into a
temporary sql root (with a copy of common.sql) and generated with the project's own generator, exactly as a user
adds a peer type (docs/manifest.md). Every name is ours and checked by the manifest parser; values are written as
TOML (json.dumps gives valid TOML strings and arrays of integers).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from peer.dejima.install import COMMON_SQL, SQL_ROOT
from peer.dejima.sqlgen import write_all


@dataclass(frozen=True)
class ViewDef:
    name: str
    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    members: tuple[str, ...]
    filter_in: dict[str, tuple[int, ...]] = field(default_factory=dict)  # column -> allowed values


@dataclass(frozen=True)
class TypeDef:
    name: str
    table: str
    columns: dict[str, str]  # column -> type ("bigint not null", "text", …)
    views: tuple[ViewDef, ...]
    description: str = ""


def manifest_text(t: TypeDef) -> str:
    lines = [f"peer_type = {json.dumps(t.name)}", f"description = {json.dumps(t.description or t.name)}", ""]
    lines.append(f"[tables.{t.table}.columns]")
    lines += [f"{col} = {json.dumps(typ)}" for col, typ in t.columns.items()]
    for v in t.views:
        lines += ["", f"[views.{v.name}]", f"table = {json.dumps(v.table)}"]
        lines.append(f"columns = {json.dumps(list(v.columns))}")
        lines.append(f"key = {json.dumps(list(v.key))}")
        lines.append(f"members = {json.dumps(list(v.members))}")
        if v.filter_in:
            conds = ", ".join(
                f'{{ column = {json.dumps(col)}, op = "in", value = {json.dumps(list(vals))} }}'
                for col, vals in v.filter_in.items()
            )
            lines.append(f"filter = [{conds}]")
    return "\n".join(lines) + "\n"


def write_root(root: Path, types: list[TypeDef]) -> Path:
    """A sql root holding these peer types (manifest + generated SQL) and common.sql."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SQL_ROOT / COMMON_SQL, root / COMMON_SQL)  # install runs <root>/common.sql first
    for t in types:
        (root / t.name).mkdir(exist_ok=True)
        (root / t.name / "manifest.toml").write_text(manifest_text(t))
    write_all(root)
    return root


# ------------------------------------------------------------------------------------------------ trees (ycsb)

YCSB_TABLE = "usertable"
YCSB_COLUMNS = {"ycsb_key": "bigint not null", "home": "integer not null", "field0": "text"}


def random_tree(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Edges (parent, child) of a random recursive tree on peers 0..n-1: peer i attaches to a uniformly chosen
    earlier peer."""
    return [(rng.randrange(i), i) for i in range(1, n)]


def tree_peer(i: int) -> str:
    return f"p{i}"


def edge_view(a: int, b: int) -> str:
    lo, hi = sorted((a, b))
    return f"e_{lo}_{hi}"


def neighbours(n: int, edges: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {i: [] for i in range(n)}
    for a, b in edges:
        out[a].append(b)
        out[b].append(a)
    return {i: sorted(v) for i, v in out.items()}


def tree_types(n: int, edges: list[tuple[int, int]]) -> list[TypeDef]:
    """One peer type per peer (p0 … p<n-1>), one table `usertable(ycsb_key, home, field0)`, one dejima view per tree
    edge a-b carrying the records whose home is a or b (filter `home in [a, b]`, the same at both ends).

    So a record lives at its home peer and at the home's neighbours; a write at its home reaches every neighbour
    (1 hop); a write at a neighbour reaches the home (1 hop) and, through the home's other views, the home's other
    neighbours (2 hops)."""
    nbrs = neighbours(n, edges)
    types = []
    for i in range(n):
        views = tuple(
            ViewDef(
                name=edge_view(i, j),
                table=YCSB_TABLE,
                columns=("ycsb_key", "home", "field0"),
                key=("ycsb_key",),
                members=tuple(tree_peer(k) for k in sorted((i, j))),
                filter_in={"home": tuple(sorted((i, j)))},
            )
            for j in nbrs[i]
        )
        types.append(
            TypeDef(tree_peer(i), YCSB_TABLE, dict(YCSB_COLUMNS), views, f"ycsb tree peer {i} of {n} (generated)")
        )
    return types


# ------------------------------------------------------------------------------------------------ stars (fanout)

STAR_TABLE = "items"
STAR_COLUMNS = {"item_key": "bigint not null", "value": "text"}


def star_peer(size: int, i: int) -> str:
    return f"s{size}m{i}"


def star_view(size: int) -> str:
    return f"star{size}"


def star_types(size: int) -> list[TypeDef]:
    """`size` peer types s<size>m0 … sharing one view star<size>(item_key, value) with every member."""
    members = tuple(star_peer(size, i) for i in range(size))
    view = ViewDef(star_view(size), STAR_TABLE, ("item_key", "value"), ("item_key",), members)
    return [
        TypeDef(m, STAR_TABLE, dict(STAR_COLUMNS), (view,), f"member {i} of a star of {size} (generated)")
        for i, m in enumerate(members)
    ]

"""Peer types as data: parse and validate `sql_triggers/<peer type>/manifest.toml`.

The format is documented in docs/manifest.md. Every problem is reported as one `ManifestError` naming the file
and the field; nothing downstream ever sees a half-valid manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.toml"
ID_COLUMN = "id"
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")

# Column types a manifest may use, mapped to the PostgreSQL type they create.
COLUMN_TYPES: dict[str, str] = {
    "text": "text",
    "integer": "integer",
    "bigint": "bigint",
    "numeric": "numeric",
    "double precision": "double precision",
    "boolean": "boolean",
    "date": "date",
    "timestamptz": "timestamptz",
}
FILTER_OPS = ("=", "<>", "<", "<=", ">", ">=", "in", "not in", "is null", "is not null")
# Which TOML values a column type takes (filter values, defaults); dates and timestamps are written as strings.
VALUE_KINDS: dict[str, tuple[type, ...]] = {
    "text": (str,),
    "integer": (int,),
    "bigint": (int,),
    "numeric": (int, float),
    "double precision": (int, float),
    "boolean": (bool,),
    "date": (str,),
    "timestamptz": (str,),
}
Scalar = str | int | float | bool


class ManifestError(Exception):
    """A manifest is malformed. The message names the file and the field."""

    def __init__(self, path: Path | str, field_name: str, message: str) -> None:
        self.path = str(path)
        self.field = field_name
        self.detail = message
        super().__init__(f"{self.path}: {field_name}: {message}")


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True)
class Condition:
    """One condition of a view's row filter; a filter is the AND of its conditions."""

    column: str
    op: str
    value: Scalar | tuple[Scalar, ...] | None = None


@dataclass(frozen=True)
class View:
    name: str
    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    members: tuple[str, ...]
    filter: tuple[Condition, ...] = ()
    defaults: tuple[tuple[str, Scalar], ...] = ()

    def default_for(self, column: str) -> Scalar | None:
        return dict(self.defaults).get(column)

    def signature(self, table: Table) -> dict[str, Any]:
        """What every member of the view must agree on: name, columns with types, key, members."""
        types = {c.name: c.type for c in table.columns}
        return {
            "view": self.name,
            "columns": [[c, types[c]] for c in self.columns],
            "key": list(self.key),
            "members": sorted(self.members),
        }

    def schema_hash(self, table: Table) -> str:
        blob = json.dumps(self.signature(table), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class PeerType:
    name: str
    description: str
    path: Path
    tables: tuple[Table, ...]
    views: tuple[View, ...]
    extra_sql: tuple[Path, ...] = field(default=())

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    def view(self, name: str) -> View:
        return next(v for v in self.views if v.name == name)

    def views_of(self, table: str) -> tuple[View, ...]:
        return tuple(v for v in self.views if v.table == table)


def _check_name(path: Path, field_name: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ManifestError(
            path, field_name, f"{value!r} is not a valid name (lower-case letters, digits, _; at most 48)"
        )
    return value


def _str_list(path: Path, field_name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ManifestError(path, field_name, "must be a non-empty list of names")
    if len(set(value)) != len(value):
        raise ManifestError(path, field_name, "lists a name twice")
    return tuple(value)


def _parse_column(path: Path, field_name: str, name: str, spec: object) -> Column:
    _check_name(path, field_name, name)
    if name == ID_COLUMN:
        raise ManifestError(path, field_name, f"'{ID_COLUMN}' is the generated surrogate key; do not declare it")
    if not isinstance(spec, str):
        raise ManifestError(path, field_name, 'must be a type such as "text" or "integer not null"')
    words = spec.strip().lower()
    not_null = words.endswith(" not null")
    base = words.removesuffix(" not null").strip()
    if base not in COLUMN_TYPES:
        raise ManifestError(path, field_name, f"unknown type {spec!r}; known: {', '.join(COLUMN_TYPES)}")
    return Column(name, COLUMN_TYPES[base], not_null)


def _parse_table(path: Path, name: str, spec: object) -> Table:
    where = f"tables.{name}"
    _check_name(path, where, name)
    if not isinstance(spec, dict) or not isinstance(spec.get("columns"), dict) or not spec["columns"]:
        raise ManifestError(path, f"{where}.columns", "a table needs a non-empty [columns] table")
    unknown = set(spec) - {"columns"}
    if unknown:
        raise ManifestError(path, f"{where}.{sorted(unknown)[0]}", "unknown field")
    columns = tuple(
        _parse_column(path, f"{where}.columns.{cname}", cname, cspec) for cname, cspec in spec["columns"].items()
    )
    return Table(name, columns)


def _scalar(path: Path, field_name: str, value: object, column: Column | None = None) -> Scalar:
    if not isinstance(value, str | int | float | bool):
        raise ManifestError(path, field_name, f"{value!r} is not a string, number or boolean")
    pg_type = column.type if column is not None else "bigint"  # no column: the surrogate id
    kinds = VALUE_KINDS[pg_type]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = "a quoted string" if kinds == (str,) else " or ".join(k.__name__ for k in kinds)
        raise ManifestError(path, field_name, f"{value!r} does not fit type {pg_type} (write {expected})")
    return value


def _parse_filter(path: Path, where: str, table: Table, spec: object) -> tuple[Condition, ...]:
    if not isinstance(spec, list) or not all(isinstance(c, dict) for c in spec):
        raise ManifestError(path, where, "must be a list of {column, op, value} conditions")
    out = []
    for i, cond in enumerate(spec):
        cwhere = f"{where}[{i}]"
        unknown = set(cond) - {"column", "op", "value"}
        if unknown:
            raise ManifestError(path, f"{cwhere}.{sorted(unknown)[0]}", "unknown field")
        column = cond.get("column")
        if not isinstance(column, str) or (column != ID_COLUMN and table.column(column) is None):
            raise ManifestError(path, f"{cwhere}.column", f"{column!r} is not a column of table {table.name}")
        op = str(cond.get("op", "")).lower()
        if op not in FILTER_OPS:
            raise ManifestError(path, f"{cwhere}.op", f"{cond.get('op')!r} is not one of {', '.join(FILTER_OPS)}")
        value: Scalar | tuple[Scalar, ...] | None
        if op in ("is null", "is not null"):
            if "value" in cond:
                raise ManifestError(path, f"{cwhere}.value", f"'{op}' takes no value")
            value = None
        elif op in ("in", "not in"):
            raw = cond.get("value")
            if not isinstance(raw, list) or not raw:
                raise ManifestError(path, f"{cwhere}.value", f"'{op}' needs a non-empty list")
            value = tuple(_scalar(path, f"{cwhere}.value", v, table.column(column)) for v in raw)
        else:
            if "value" not in cond:
                raise ManifestError(path, f"{cwhere}.value", f"'{op}' needs a value")
            value = _scalar(path, f"{cwhere}.value", cond["value"], table.column(column))
        out.append(Condition(column, op, value))
    return tuple(out)


def _parse_view(path: Path, name: str, spec: object, tables: dict[str, Table]) -> View:
    where = f"views.{name}"
    _check_name(path, where, name)
    if not isinstance(spec, dict):
        raise ManifestError(path, where, "must be a table")
    unknown = set(spec) - {"table", "columns", "key", "members", "filter", "defaults", "description"}
    if unknown:
        raise ManifestError(path, f"{where}.{sorted(unknown)[0]}", "unknown field")
    table_name = spec.get("table")
    if not isinstance(table_name, str) or table_name not in tables:
        raise ManifestError(path, f"{where}.table", f"{table_name!r} is not a table of this manifest")
    table = tables[table_name]
    columns = _str_list(path, f"{where}.columns", spec.get("columns"))
    for col in columns:
        if col == ID_COLUMN:
            raise ManifestError(path, f"{where}.columns", "the surrogate 'id' is private to each peer")
        if table.column(col) is None:
            raise ManifestError(path, f"{where}.columns", f"{col!r} is not a column of table {table.name}")
    key = _str_list(path, f"{where}.key", spec.get("key"))
    for col in key:
        if col not in columns:
            raise ManifestError(path, f"{where}.key", f"key column {col!r} is not in the view's columns")
        column = table.column(col)
        if column is not None and not column.not_null:
            raise ManifestError(path, f"{where}.key", f"key column {col!r} must be declared 'not null' in {table.name}")
    members = _str_list(path, f"{where}.members", spec.get("members"))
    for member in members:
        _check_name(path, f"{where}.members", member)
    conditions = _parse_filter(path, f"{where}.filter", table, spec.get("filter", []))
    raw_defaults = spec.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        raise ManifestError(path, f"{where}.defaults", "must be a table of column = value")
    defaults: list[tuple[str, Scalar]] = []
    for col, value in raw_defaults.items():
        dwhere = f"{where}.defaults.{col}"
        if table.column(col) is None:
            raise ManifestError(path, dwhere, f"{col!r} is not a column of table {table.name}")
        if col in columns:
            raise ManifestError(path, dwhere, "the view carries this column; defaults are for the others")
        defaults.append((col, _scalar(path, dwhere, value, table.column(col))))
    given = dict(defaults)
    for column in table.columns:
        if column.not_null and column.name not in columns and column.name not in given:
            raise ManifestError(
                path,
                f"{where}.defaults",
                f"column {column.name!r} is NOT NULL and not in the view: give a default",
            )
    return View(name, table.name, columns, key, members, conditions, tuple(defaults))


def load_manifest(folder: Path) -> PeerType:
    """Parse and validate one peer type folder (its members are checked by `load_peer_types`)."""
    path = folder / MANIFEST_NAME
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(path, "(file)", "missing") from None
    except tomllib.TOMLDecodeError as exc:
        twice = re.search(r"Cannot declare \('views', '([^']+)'\) twice", str(exc))
        if twice:
            raise ManifestError(path, f"views.{twice.group(1)}", "duplicate view name") from None
        raise ManifestError(path, "(syntax)", str(exc)) from None
    unknown = set(raw) - {"peer_type", "description", "tables", "views"}
    if unknown:
        raise ManifestError(path, sorted(unknown)[0], "unknown field")
    name = _check_name(path, "peer_type", raw.get("peer_type"))
    if name != folder.name:
        raise ManifestError(path, "peer_type", f"{name!r} must equal the folder name {folder.name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ManifestError(path, "description", "must be a string")
    if not isinstance(raw.get("tables"), dict) or not raw["tables"]:
        raise ManifestError(path, "tables", "declare at least one base table")
    tables = {tname: _parse_table(path, tname, tspec) for tname, tspec in raw["tables"].items()}
    raw_views = raw.get("views", {})
    if not isinstance(raw_views, dict):
        raise ManifestError(path, "views", "must be a table of views")
    views = tuple(_parse_view(path, vname, vspec, tables) for vname, vspec in raw_views.items())
    # Names PostgreSQL or the generator give to other relations of the schema (identity sequence, primary key and
    # identity key indexes): a table or view with one of them would clash at install.
    implicit = {f"{t}_{suffix}": f"table {t}" for t in tables for suffix in ("id_seq", "pkey")}
    implicit.update({f"{v.name}_key": f"the key index of view {v.name}" for v in views})
    for tname in tables:
        if tname in implicit:
            raise ManifestError(path, f"tables.{tname}", f"name is taken by {implicit[tname]}")
    for view in views:
        if view.name in tables:
            raise ManifestError(path, f"views.{view.name}", "duplicate view name: a table has the same name")
        if view.name in implicit:
            raise ManifestError(path, f"views.{view.name}", f"name is taken by {implicit[view.name]}")
        if name not in view.members:
            raise ManifestError(path, f"views.{view.name}.members", f"must include this peer type {name!r}")
    extra = tuple(sorted(p for p in folder.glob("*.sql") if p.name != "generated.sql" and not p.name.startswith(".")))
    return PeerType(name, description, path, tuple(tables.values()), views, extra)


def peer_type_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def load_peer_types(root: Path) -> dict[str, PeerType]:
    """Load every peer type under `root` and check them against each other."""
    types = {folder.name: load_manifest(folder) for folder in peer_type_folders(root)}
    for ptype in types.values():
        for view in ptype.views:
            where = f"views.{view.name}.members"
            signature = view.signature(ptype.table(view.table))
            for member in view.members:
                if member not in types:
                    raise ManifestError(ptype.path, where, f"member peer type {member!r} does not exist")
                other = types[member]
                theirs = next((v for v in other.views if v.name == view.name), None)
                if theirs is None:
                    raise ManifestError(ptype.path, where, f"member {member!r} does not declare {view.name}")
                if theirs.signature(other.table(theirs.table)) != signature:
                    raise ManifestError(
                        ptype.path,
                        f"views.{view.name}",
                        f"differs from {member}'s definition (columns, types, key and members must agree)",
                    )
    return types

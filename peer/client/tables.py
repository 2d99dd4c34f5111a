"""The base tables the client shows, from the peer type's manifest: columns, types, sharing, validation and SQL.

- `describe(ptype, status)`: every base table with its columns and, per column, the dejima views it is shared
  through and with which peers (the live dejima groups from GET /api/v1/status; the manifest's member peer types
  when the peer cannot be asked).
- `validate_row(table, data, partial, strict)`: check a row against the manifest (unknown column, surrogate id,
  wrong type, required column) with DRF fields; raises `RowInvalid` whose message names the column.
- `insert_sql` / `update_sql` / `delete_sql` / `select_*_sql`: statements composed with `psycopg.sql.Identifier`
  for names and `psycopg.sql.Literal` for values, rendered with `as_string(None)`; never string formatting.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from rest_framework import serializers
from rest_framework.fields import Field

from peer.dejima.manifest import ID_COLUMN, Condition, PeerType, Scalar, View

INT_RANGE = {"integer": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}
# What a value of each type must look like; used in the messages.
TYPE_WORDS = {
    "text": "text",
    "integer": "a whole number",
    "bigint": "a whole number",
    "numeric": "a number",
    "double precision": "a number",
    "boolean": "true or false",
    "date": "a date (write YYYY-MM-DD)",
    "timestamptz": "a date and time (write YYYY-MM-DD HH:MM[:SS][+HH:MM])",
}
# JSON value kinds each type accepts from the REST API (numeric also takes a decimal string: exact).
JSON_KINDS: dict[str, tuple[type, ...]] = {
    "text": (str,),
    "integer": (int,),
    "bigint": (int,),
    "numeric": (int, float, str),
    "double precision": (int, float),
    "boolean": (bool,),
    "date": (str,),
    "timestamptz": (str,),
}


@dataclass(frozen=True)
class Share:
    """One dejima view a column (or table) is shared through, and the peers of its dejima group."""

    view: str
    peers: tuple[str, ...]
    live: bool  # True: peer names of the live group; False: member peer types from the manifest
    rows: str = ""  # the view's row filter in words ("" = every row)

    @property
    def label(self) -> str:
        return f"{self.view} → {', '.join(self.peers)}"

    def to_json(self) -> dict[str, Any]:
        return {"view": self.view, "peers": list(self.peers), "live": self.live, "rows": self.rows or "all"}


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str
    not_null: bool
    shares: tuple[Share, ...] = ()

    @property
    def is_id(self) -> bool:
        return self.name == ID_COLUMN

    @property
    def input_type(self) -> str:
        """The HTML input type of the column's form field."""
        return {"integer": "number", "bigint": "number", "date": "date"}.get(self.type, "text")

    @property
    def placeholder(self) -> str:
        return {"date": "YYYY-MM-DD", "timestamptz": "YYYY-MM-DD HH:MM:SS+00", "boolean": "true / false"}.get(
            self.type, ""
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "not_null": self.not_null,
            "read_only": self.is_id,
            "shared": [s.to_json() for s in self.shares],
        }


@dataclass(frozen=True)
class TableInfo:
    name: str
    columns: tuple[ColumnInfo, ...]  # the surrogate id first, then the manifest's columns
    shares: tuple[Share, ...]  # every dejima view over this table

    @property
    def editable(self) -> tuple[ColumnInfo, ...]:
        return tuple(c for c in self.columns if not c.is_id)

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "columns": [c.to_json() for c in self.columns],
            "shared": [s.to_json() for s in self.shares],
        }


def _condition_words(cond: Condition) -> str:
    if cond.value is None:
        return f"{cond.column} {cond.op}"
    if isinstance(cond.value, tuple):
        return f"{cond.column} {cond.op} ({', '.join(map(repr, cond.value))})"
    return f"{cond.column} {cond.op} {cond.value!r}"


def _share(view: View, groups: Mapping[str, Any] | None) -> Share:
    rows = " and ".join(_condition_words(c) for c in view.filter)
    members = groups.get(view.name) if groups is not None else None
    if isinstance(members, list) and members:
        return Share(view.name, tuple(sorted(str(m) for m in members)), True, rows)
    return Share(view.name, tuple(sorted(view.members)), False, rows)


def describe(ptype: PeerType, status: Mapping[str, Any] | None) -> list[TableInfo]:
    """Every base table of the peer type with its sharing; `status` is GET /api/v1/status (None: unknown)."""
    groups = status.get("groups") if status is not None else None
    groups = groups if isinstance(groups, dict) else None
    tables = []
    for table in ptype.tables:
        shares = tuple(_share(v, groups) for v in ptype.views_of(table.name))
        view_cols = {s.view: ptype.view(s.view).columns for s in shares}
        columns = [ColumnInfo(ID_COLUMN, "bigint", True)]
        columns += [
            ColumnInfo(c.name, c.type, c.not_null, tuple(s for s in shares if c.name in view_cols[s.view]))
            for c in table.columns
        ]
        tables.append(TableInfo(table.name, tuple(columns), shares))
    return tables


# ---- validation -----------------------------------------------------------------------------------------------
class RowInvalid(Exception):
    """A row does not fit its table. `errors` maps a column (or "non_field") to plain messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(m for msgs in errors.values() for m in msgs))


def _field(column: ColumnInfo) -> Field[Any, Any, Any, Any]:
    """A DRF field checking one column's values (required = NOT NULL)."""
    common: dict[str, Any] = {
        "required": column.not_null,
        "allow_null": not column.not_null,
        "error_messages": {"invalid": f"is not {TYPE_WORDS[column.type]}"},
    }
    if column.type == "text":
        return serializers.CharField(allow_blank=True, trim_whitespace=False, **common)
    if column.type in INT_RANGE:
        low, high = INT_RANGE[column.type]
        return serializers.IntegerField(min_value=low, max_value=high, **common)
    if column.type == "numeric":
        return serializers.DecimalField(max_digits=None, decimal_places=None, **common)
    if column.type == "double precision":
        return serializers.FloatField(**common)
    if column.type == "boolean":
        return serializers.BooleanField(**common)
    if column.type == "date":
        return serializers.DateField(**common)
    if column.type == "timestamptz":
        return serializers.DateTimeField(**common)
    raise AssertionError(f"column type {column.type} has no field")  # manifest.COLUMN_TYPES is closed


class RowSerializer(serializers.Serializer[Any]):
    """The editable columns of one base table, built from the manifest."""

    def __init__(self, table: TableInfo, **kwargs: Any) -> None:
        self.table = table
        super().__init__(**kwargs)

    def get_fields(self) -> dict[str, Field[Any, Any, Any, Any]]:
        return {c.name: _field(c) for c in self.table.editable}


def validate_row(table: TableInfo, data: object, *, partial: bool, strict: bool) -> dict[str, Any]:
    """Column -> Python value, checked against the manifest. `partial`: an update (only the given columns);
    `strict`: JSON input, whose values must already have the column's JSON type (a string is not a number).
    Raises RowInvalid naming every bad column."""
    if not isinstance(data, Mapping):
        raise RowInvalid({"non_field": ["expected a JSON object of column: value"]})
    errors: dict[str, list[str]] = {}
    for name in data:
        if name == ID_COLUMN:
            errors[name] = [f"{ID_COLUMN} is assigned by the peer and cannot be set"]
        elif table.column(name) is None:
            known = ", ".join(c.name for c in table.editable)
            errors[name] = [f"unknown column {name!r} of table {table.name} (its columns: {known})"]
    if errors:
        raise RowInvalid(errors)
    if partial and not data:
        raise RowInvalid({"non_field": ["nothing to change: give at least one column"]})
    if strict:
        for name, value in data.items():
            column = table.column(name)
            assert column is not None
            kinds = JSON_KINDS[column.type]
            if value is not None and (isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)):
                errors[name] = [f"{name}: {value!r} is not {TYPE_WORDS[column.type]}"]
        if errors:
            raise RowInvalid(errors)
    serializer = RowSerializer(table, data=dict(data), partial=partial)
    if not serializer.is_valid():
        for name, details in serializer.errors.items():
            errors[name] = [_message(name, data.get(name), d) for d in details]
        raise RowInvalid(errors)
    validated: dict[str, Any] = dict(serializer.validated_data)
    return validated


def _message(column: str, value: object, detail: Any) -> str:
    code = getattr(detail, "code", "")
    if code in ("required", "null"):
        return f"{column} is required"
    if code == "invalid":
        return f"{column}: {value!r} {detail}"
    return f"{column}: {detail}"


def form_data(table: TableInfo, post: Mapping[str, str]) -> dict[str, str | None]:
    """The table's columns from an HTML form; an empty field is NULL."""
    out: dict[str, str | None] = {}
    for column in table.editable:
        if column.name in post:
            raw = post[column.name]
            out[column.name] = raw if raw != "" else None
    return out


def display(value: object) -> str:
    """A value as a form field shows it ("" for NULL)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- SQL ------------------------------------------------------------------------------------------------------
def _lit(value: Scalar | datetime.date | decimal.Decimal | None) -> sql.Composable:
    return sql.Literal(value)


def _cols(table: TableInfo) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in table.column_names)


def select_rows_sql(table: TableInfo, limit: int, offset: int) -> str:
    return (
        sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT {} OFFSET {}")
        .format(_cols(table), sql.Identifier(table.name), sql.Identifier(ID_COLUMN), _lit(limit), _lit(offset))
        .as_string(None)
    )


def count_rows_sql(table: TableInfo) -> str:
    return sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table.name)).as_string(None)


def select_row_sql(table: TableInfo, row_id: int) -> str:
    return (
        sql.SQL("SELECT {} FROM {} WHERE {} = {}")
        .format(_cols(table), sql.Identifier(table.name), sql.Identifier(ID_COLUMN), _lit(row_id))
        .as_string(None)
    )


def find_row_sql(table: TableInfo, values: Mapping[str, Any]) -> str:
    """The newest row with these values (to show the row a write just inserted)."""
    where: sql.Composable = sql.SQL("true")
    if values:
        where = sql.SQL(" AND ").join(
            sql.SQL("{} IS NOT DISTINCT FROM {}").format(sql.Identifier(k), _lit(v)) for k, v in values.items()
        )
    return (
        sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} DESC LIMIT 1")
        .format(_cols(table), sql.Identifier(table.name), where, sql.Identifier(ID_COLUMN))
        .as_string(None)
    )


def insert_sql(table: TableInfo, values: Mapping[str, Any]) -> str:
    if not values:
        return sql.SQL("INSERT INTO {} DEFAULT VALUES").format(sql.Identifier(table.name)).as_string(None)
    return (
        sql.SQL("INSERT INTO {} ({}) VALUES ({})")
        .format(
            sql.Identifier(table.name),
            sql.SQL(", ").join(sql.Identifier(k) for k in values),
            sql.SQL(", ").join(_lit(v) for v in values.values()),
        )
        .as_string(None)
    )


def update_sql(table: TableInfo, row_id: int, values: Mapping[str, Any]) -> str:
    assignments = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), _lit(v)) for k, v in values.items())
    return (
        sql.SQL("UPDATE {} SET {} WHERE {} = {}")
        .format(sql.Identifier(table.name), assignments, sql.Identifier(ID_COLUMN), _lit(row_id))
        .as_string(None)
    )


def delete_sql(table: TableInfo, row_id: int) -> str:
    return (
        sql.SQL("DELETE FROM {} WHERE {} = {}")
        .format(sql.Identifier(table.name), sql.Identifier(ID_COLUMN), _lit(row_id))
        .as_string(None)
    )

"""SQL generation from manifests: deterministic, committed files fresh, identifiers quoted, values as literals."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from peer.dejima.manifest import PeerType, load_manifest, load_peer_types
from peer.dejima.sqlgen import GENERATED_NAME, filter_sql, generate, generate_all, stale_files

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = REPO_ROOT / "sql_triggers"

SCHOOL = """\
peer_type = "school"

[tables.pupil.columns]
first_name = "text not null"
last_name = "text not null"
"order" = "integer"
school = "text"
guardian = "text not null"
note = "text"

[views.dejima_pupils]
table = "pupil"
columns = ["first_name", "last_name", "order"]
key = ["first_name", "last_name"]
members = ["school"]
defaults = { guardian = "O'Brien", note = "back\\\\slash" }
"""

FILTERED = """\
[views.dejima_hosei_free]
table = "pupil"
columns = ["first_name", "last_name", "school"]
key = ["first_name", "last_name"]
members = ["school"]
defaults = { guardian = "nobody" }
filter = [
  { column = "school", op = "<>", value = "Hosei" },
  { column = "order", op = "in", value = [1, 2] },
  { column = "note", op = "is null" },
]
"""


def school(tmp_path: Path, extra: str = "") -> PeerType:
    folder = tmp_path / "school"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.toml").write_text(SCHOOL + extra)
    return load_manifest(folder)


def statement(text: str, start: str) -> str:
    """The statement of text that begins with `start` (up to its terminating `;` or `$dejima$;`)."""
    at = text.index(start)
    end = text.index("\n$dejima$;", at) if start.startswith("CREATE OR REPLACE FUNCTION") else text.index(";", at)
    return text[at:end]


def function(text: str, name: str) -> str:
    return statement(text, f'CREATE OR REPLACE FUNCTION "dejima"."{name}"()')


# ----------------------------------------------------------------------------------------- determinism, freshness


def test_the_shipped_generated_sql_is_up_to_date() -> None:
    assert stale_files(SHIPPED) == []
    for path, text in generate_all(SHIPPED).items():
        assert path.read_text() == text


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = {p.parent.name: t for p, t in generate_all(SHIPPED).items()}
    again = {p.parent.name: t for p, t in generate_all(SHIPPED).items()}
    assert first == again
    # independent of where the folders are
    shutil.copytree(SHIPPED, tmp_path / "elsewhere")
    moved = {p.parent.name: t for p, t in generate_all(tmp_path / "elsewhere").items()}
    assert moved == first
    # independent of the process: a fresh parse gives the same text
    assert generate(load_manifest(SHIPPED / "bank")) == first["bank"]


def test_the_header_names_the_type_and_the_schema_hashes() -> None:
    types = load_peer_types(SHIPPED)
    for ptype in types.values():
        text = generate(ptype)
        lines = text.splitlines()
        assert f"({ptype.name})" in lines[0]
        assert "Do not edit" in lines[0]
        for view in ptype.views:
            assert f"{view.name}={view.schema_hash(ptype.table(view.table))}" in lines[1]


def test_members_of_a_view_carry_the_same_schema_hash() -> None:
    texts = {p.parent.name: t for p, t in generate_all(SHIPPED).items()}
    hashes = {name: dict(re.findall(r"(\w+)=([0-9a-f]{16})", t.splitlines()[1])) for name, t in texts.items()}
    assert hashes["government"]["dejima_bank"] == hashes["bank"]["dejima_bank"]
    assert hashes["government"]["dejima_insurance"] == hashes["insurance"]["dejima_insurance"]
    assert hashes["bank"]["dejima_risk"] == hashes["insurance"]["dejima_risk"]


# ----------------------------------------------------------------------------------------- quoting


def test_identifiers_are_quoted_and_schema_qualified(tmp_path: Path) -> None:
    text = generate(school(tmp_path))
    assert 'CREATE TABLE IF NOT EXISTS "public"."pupil" (' in text
    assert '"order" integer' in text  # a reserved word is a fine column name
    assert 'CREATE OR REPLACE VIEW "public"."dejima_pupils" AS' in text
    assert 'SELECT "t"."first_name", "t"."last_name", "t"."order"' in text
    assert 'INSTEAD OF INSERT ON "public"."dejima_pupils"' in text
    assert 'AFTER INSERT ON "public"."pupil"' in text
    # no unquoted reference to a manifest name anywhere outside comments and string literals
    code = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    code = re.sub(r"'(?:[^']|'')*'", "''", code)
    for name in ("pupil", "dejima_pupils", "first_name", "last_name", "order", "guardian", "note", "school"):
        assert re.search(rf'(?<!["\w]){name}(?![\w"])', code) is None, name


def test_default_values_are_sql_literals(tmp_path: Path) -> None:
    text = generate(school(tmp_path))
    insert = function(text, "put_dejima_pupils_ins")
    assert "CAST('O''Brien' AS text)" in insert
    assert "CAST( E'back\\\\slash' AS text)" in insert  # psycopg's escape-string form
    assert '("first_name", "last_name", "order", "guardian", "note")' in insert
    assert 'VALUES ("new"."first_name", "new"."last_name", "new"."order", CAST(' in insert
    # defaults are only used where a row is created, never in update (private columns are kept)
    assert "O''Brien" not in function(text, "put_dejima_pupils_upd")


def test_filter_values_are_typed_sql_literals(tmp_path: Path) -> None:
    ptype = school(tmp_path, FILTERED)
    view = ptype.view("dejima_hosei_free")
    rendered = filter_sql(view, ptype.table("pupil"), "t").as_string(None)
    assert rendered == (
        '("t"."school" <> CAST(\'Hosei\' AS text) AND "t"."order" IN (CAST(1 AS integer), CAST(2 AS integer))'
        ' AND "t"."note" IS NULL)'
    )


def test_a_quote_in_a_filter_value_stays_inside_the_literal(tmp_path: Path) -> None:
    extra = FILTERED.replace('value = "Hosei"', 'value = "x\' OR TRUE; --"')
    ptype = school(tmp_path, extra)
    text = generate(ptype)
    assert "CAST('x'' OR TRUE; --' AS text)" in text
    assert "'x' OR TRUE" not in text


# ----------------------------------------------------------------------------------------- views without / with filter


def test_a_view_without_filter_has_no_where(tmp_path: Path) -> None:
    text = generate(school(tmp_path))
    view = statement(text, 'CREATE OR REPLACE VIEW "public"."dejima_pupils"')
    assert "WHERE" not in view
    index = statement(text, 'CREATE UNIQUE INDEX IF NOT EXISTS "dejima_pupils_key"')
    assert index.endswith('ON "public"."pupil" ("first_name", "last_name")')
    assert "dejima_in_view" not in text
    assert "check_violation" not in text
    for name in ("capture_pupil_ins", "capture_pupil_del"):  # the only WHERE: its lookup of the registered gxid
        assert function(text, name).count("WHERE") == 1
        assert "WHERE a.xid = pg_current_xact_id_if_assigned()" in function(text, name)
    update = function(text, "put_dejima_pupils_upd")
    assert 'WHERE "t"."first_name" = "old"."first_name" AND "t"."last_name" = "old"."last_name";' in update


def test_the_shipped_views_have_no_filter() -> None:
    for path, text in generate_all(SHIPPED).items():
        for view in re.findall(r"CREATE OR REPLACE VIEW .*?;", text, re.S):
            assert "WHERE" not in view, path
        assert "check_violation" not in text


def test_a_view_with_filter_renders_it_in_view_index_putback_and_capture(tmp_path: Path) -> None:
    ptype = school(tmp_path, FILTERED)
    text = generate(ptype)
    cond_t = filter_sql(ptype.view("dejima_hosei_free"), ptype.table("pupil"), "t").as_string(None)

    view = statement(text, 'CREATE OR REPLACE VIEW "public"."dejima_hosei_free"')
    assert view.endswith(f'FROM "public"."pupil" AS t\n    WHERE {cond_t}')

    index = statement(text, 'CREATE UNIQUE INDEX IF NOT EXISTS "dejima_hosei_free_key"')
    assert index.endswith(" WHERE " + cond_t.replace('"t".', '"pupil".'))
    assert '"pupil"."school" <> CAST(\'Hosei\' AS text)' in index
    # the unfiltered view over the same table keeps its own, unconditional index
    assert statement(text, 'CREATE UNIQUE INDEX IF NOT EXISTS "dejima_pupils_key"').endswith(
        '("first_name", "last_name")'
    )

    insert = function(text, "put_dejima_hosei_free_ins")
    assert f"RETURNING coalesce({cond_t}, false) INTO dejima_in_view" in insert
    assert "IF NOT dejima_in_view THEN" in insert
    assert "ERRCODE = 'check_violation'" in insert
    assert "outside the view" in insert

    update = function(text, "put_dejima_hosei_free_upd")
    assert f'"t"."last_name" = "old"."last_name" AND {cond_t}' in update  # only rows inside the view are matched
    assert f"RETURNING coalesce({cond_t}, false) INTO dejima_in_view" in update
    assert "ERRCODE = 'check_violation'" in update

    delete = function(text, "put_dejima_hosei_free_del")
    assert f'"t"."last_name" = "old"."last_name" AND {cond_t};' in delete

    for name, alias in (("capture_pupil_ins", "n"), ("capture_pupil_del", "o")):
        captured = function(text, name)
        assert f"WHERE {cond_t.replace(chr(34) + 't' + chr(34), chr(34) + alias + chr(34))}" in captured
    update_capture = function(text, "capture_pupil_upd")
    assert '("o"."id" IS NOT NULL AND coalesce(("o"."school" <> CAST(\'Hosei\' AS text)' in update_capture
    assert '("n"."id" IS NOT NULL AND coalesce(("n"."school" <> CAST(\'Hosei\' AS text)' in update_capture


def test_every_function_resolves_bare_names_as_variables(tmp_path: Path) -> None:
    text = generate(school(tmp_path, FILTERED))
    functions = text.count("CREATE OR REPLACE FUNCTION")
    assert functions == 2 * 3 + 4  # putback of two views, capture of one table (with truncate)
    assert text.count("LANGUAGE plpgsql AS $dejima$\n#variable_conflict use_variable\n") == 2 * 3  # putback
    definer = "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dejima$\n"
    assert text.count(definer + "#variable_conflict use_variable\n") == 4  # capture: as the owner, fixed search_path


def test_a_table_without_views_gets_no_triggers(tmp_path: Path) -> None:
    ptype = school(tmp_path, '\n[tables.archive.columns]\nnote = "text"\n')
    text = generate(ptype)
    assert 'CREATE TABLE IF NOT EXISTS "public"."archive"' in text
    assert '"dejima"."capture_archive_' not in text
    assert 'ON "public"."archive"' not in text


def test_generated_text_ends_with_one_newline_and_uses_the_generated_name() -> None:
    for path, text in generate_all(SHIPPED).items():
        assert path.name == GENERATED_NAME
        assert text.endswith(";\n")
        assert not text.endswith("\n\n")

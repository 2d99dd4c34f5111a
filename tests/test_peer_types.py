"""A peer type added as data only: a folder with a manifest is generated, installed and works on real PostgreSQL.

Types `university` (table student, view dejima_students = the students not at Hosei, a default for the private
NOT NULL email) and `agency` (table applicant, the same view without filter) live in a temporary folder; nothing in
Python knows them.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.management import CommandError, call_command
from psycopg import errors, sql
from psycopg.rows import dict_row

from peer.dejima.delta import RowChange, to_deltas
from peer.dejima.install import COMMON_SQL, SQL_ROOT, InstallError, install
from peer.dejima.sqlgen import GENERATED_NAME, write_all
from tests.conftest import MakeDatabase, PeerDb
from tests.helpers import AGENCY, UNIVERSITY, register, taken

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]


ADA = {"first_name": "Ada", "last_name": "Lovelace", "university": "Keio"}
TARO = {"first_name": "Taro", "last_name": "Yamada", "university": "Hosei"}


def write_types(root: Path, generate: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SQL_ROOT / COMMON_SQL, root / COMMON_SQL)  # install runs <root>/common.sql first
    for name, text in (("university", UNIVERSITY), ("agency", AGENCY)):
        (root / name).mkdir(exist_ok=True)
        (root / name / "manifest.toml").write_text(text)
    if generate:
        write_all(root)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_types(tmp_path / "types")


@pytest.fixture
def university(peer_db: PeerDb, root: Path) -> Iterator[Conn]:
    with psycopg.connect(peer_db("university", root), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO student (first_name, last_name, university, email) VALUES"
            " ('Ada', 'Lovelace', 'Keio', 'ada@keio.example'),"
            " ('Taro', 'Yamada', 'Hosei', 'taro@hosei.example'),"
            " ('Nobu', 'Nakamura', NULL, 'nobu@example.org')"
        )
        yield conn


@pytest.fixture
def agency(peer_db: PeerDb, root: Path) -> Iterator[Conn]:
    with psycopg.connect(peer_db("agency", root), autocommit=True) as conn:
        yield conn


def view(conn: Conn, name: str = "dejima_students") -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        query = sql.SQL("SELECT * FROM {} ORDER BY first_name, last_name").format(sql.Identifier(name))
        return cur.execute(query).fetchall()


def students(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT id, first_name, last_name, university, email FROM student ORDER BY id").fetchall()


def student_id(conn: Conn, first_name: str) -> int:
    row = conn.execute("SELECT id FROM student WHERE first_name = %s", (first_name,)).fetchone()
    assert row is not None
    return int(row[0])


def captured(conn: Conn, gxid: str, *statements: str) -> list[RowChange]:
    """Run statements as one transaction of global transaction gxid and return what the triggers recorded."""
    with conn.transaction():
        register(conn, gxid)
        for stmt in statements:
            conn.execute(stmt.encode())
        return taken(conn, gxid)


def catalog(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
    """Every object install creates, with its definition, to compare two installs."""
    queries = {
        "relations": "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'dejima') ORDER BY 1, 2",
        "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname IN ('public', 'dejima') ORDER BY 1",
        "functions": "SELECT p.proname, md5(p.prosrc) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'dejima' ORDER BY 1",
        "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger"
        " WHERE NOT tgisinternal ORDER BY 1, 2",
        "installed": "SELECT peer_type, sql_sha256 FROM dejima.installed ORDER BY 1",
    }
    return {name: conn.execute(query).fetchall() for name, query in queries.items()}


# ----------------------------------------------------------------------------------------- generate and install


def test_the_commands_generate_and_install_a_peer_type_from_a_folder(
    tmp_path: Path, make_database: MakeDatabase
) -> None:
    root = write_types(tmp_path / "types", generate=False)

    out = io.StringIO()
    call_command("dejima_sql", "--root", str(root), stdout=out)
    assert "wrote" in out.getvalue()
    assert (root / "university" / GENERATED_NAME).is_file()
    assert (root / "agency" / GENERATED_NAME).is_file()
    url = make_database("pt")
    call_command("dejima_install", "--database", url, "--type", "university", "--root", str(root), stdout=out)
    assert "installed peer type university" in out.getvalue()
    with pytest.raises(CommandError, match="already holds peer type 'university'") as refused:
        call_command("dejima_install", "--database", url, "--type", "agency", "--root", str(root), stdout=out)
    assert refused.value.returncode == 1
    with psycopg.connect(url, autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace")]
        assert {"student", "dejima_students", "dejima_students_key"} <= set(names)
        assert "applicant" not in names
        assert conn.execute("SELECT peer_type FROM dejima.installed").fetchall() == [("university",)]


def test_the_view_shows_only_the_rows_inside_its_filter(university: Conn) -> None:
    assert view(university) == [ADA]  # Taro is at Hosei; Nobu's NULL university is not "<> 'Hosei'" either
    columns = [
        r[0]
        for r in university.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'dejima_students' ORDER BY ordinal_position"
        )
    ]
    assert columns == ["first_name", "last_name", "university"]  # neither id nor the private email


def test_an_insert_through_the_view_creates_a_base_row_with_the_default(university: Conn) -> None:
    university.execute("INSERT INTO dejima_students VALUES ('Grace', 'Hopper', 'Waseda')")
    row = university.execute("SELECT id, university, email FROM student WHERE first_name = 'Grace'").fetchone()
    assert row is not None
    assert row[0] > student_id(university, "Nobu")  # a fresh id from the table's sequence
    assert row[1:] == ("Waseda", "unknown@example.org")
    assert {"first_name": "Grace", "last_name": "Hopper", "university": "Waseda"} in view(university)


def test_an_update_through_the_view_keeps_the_id_and_private_columns(university: Conn) -> None:
    ada = student_id(university, "Ada")
    university.execute("UPDATE dejima_students SET university = 'Waseda', last_name = 'King' WHERE first_name = 'Ada'")
    assert university.execute(
        "SELECT id, last_name, university, email FROM student WHERE first_name = 'Ada'"
    ).fetchall() == [(ada, "King", "Waseda", "ada@keio.example")]
    university.execute("DELETE FROM dejima_students WHERE first_name = 'Ada'")
    assert university.execute("SELECT count(*) FROM student WHERE first_name = 'Ada'").fetchone() == (0,)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO dejima_students VALUES ('Jiro', 'Sato', 'Hosei')",
        "INSERT INTO dejima_students VALUES ('Jiro', 'Sato', NULL)",
        "INSERT INTO dejima_students VALUES ('Jiro', 'Sato', 'Keio'), ('Hana', 'Ito', 'Hosei')",
        "UPDATE dejima_students SET university = 'Hosei' WHERE first_name = 'Ada'",
    ],
)
def test_a_row_outside_the_filter_is_refused_and_changes_nothing(university: Conn, statement: str) -> None:
    before = students(university)
    with pytest.raises(errors.CheckViolation) as caught, university.transaction():  # noqa: PT012
        register(university, "gx-refused")
        university.execute(statement.encode())
    assert caught.value.sqlstate == "23514"
    assert "dejima_students: the row is outside the view" in str(caught.value)
    assert students(university) == before
    assert university.execute("SELECT count(*) FROM dejima.delta").fetchone() == (0,)
    assert view(university) == [ADA]


def test_a_hosei_row_is_invisible_to_updates_and_deletes_through_the_view(university: Conn) -> None:
    before = students(university)
    assert university.execute("UPDATE dejima_students SET university = 'Keio' WHERE first_name = 'Taro'").rowcount == 0
    assert university.execute("DELETE FROM dejima_students WHERE first_name = 'Taro'").rowcount == 0
    assert students(university) == before


# ----------------------------------------------------------------------------------------- capture


def test_capture_sees_a_row_crossing_the_filter_as_an_insertion_or_deletion(university: Conn) -> None:
    taro, ada = student_id(university, "Taro"), student_id(university, "Ada")
    taro_keio = {**TARO, "university": "Keio"}

    moved_in = captured(university, "gx-in", "UPDATE student SET university = 'Keio' WHERE first_name = 'Taro'")
    assert moved_in == [RowChange("dejima_students", taro, None, taro_keio)]
    delta = to_deltas(moved_in)["dejima_students"]
    assert (delta.insertions, delta.deletions) == ([taro_keio], [])

    moved_out = captured(university, "gx-out", "UPDATE student SET university = 'Hosei' WHERE first_name = 'Ada'")
    assert moved_out == [RowChange("dejima_students", ada, ADA, None)]
    delta = to_deltas(moved_out)["dejima_students"]
    assert (delta.insertions, delta.deletions) == ([], [ADA])

    inside = captured(university, "gx-upd", "UPDATE student SET university = 'Waseda' WHERE first_name = 'Taro'")
    assert inside == [RowChange("dejima_students", taro, taro_keio, {**TARO, "university": "Waseda"})]

    assert view(university) == [{**TARO, "university": "Waseda"}]
    assert university.execute("SELECT count(*) FROM dejima.delta").fetchone() == (0,)


def test_capture_ignores_rows_outside_the_filter_and_private_columns(university: Conn) -> None:
    assert (
        captured(
            university,
            "gx-quiet",
            "UPDATE student SET email = 'new@example.org'",  # private column, every row
            "UPDATE student SET university = 'Hosei' WHERE first_name = 'Nobu'",  # NULL -> Hosei: outside both times
            "INSERT INTO student (first_name, last_name, university, email) VALUES ('Jiro', 'Sato', 'Hosei', 'j@h')",
            "DELETE FROM student WHERE first_name = 'Taro'",
        )
        == []
    )


def test_capture_of_a_transaction_is_its_net_change(university: Conn) -> None:
    ada = student_id(university, "Ada")
    changes = captured(
        university,
        "gx-net",
        "UPDATE student SET university = 'Hosei' WHERE first_name = 'Ada'",  # out ...
        "UPDATE student SET university = 'Keio' WHERE first_name = 'Ada'",  # ... and back in: no change
        "INSERT INTO dejima_students VALUES ('Grace', 'Hopper', 'Waseda')",
    )
    grace = student_id(university, "Grace")
    assert grace != ada
    assert changes == [
        RowChange(
            "dejima_students", grace, None, {"first_name": "Grace", "last_name": "Hopper", "university": "Waseda"}
        )
    ]


def test_nothing_is_captured_outside_a_global_transaction(university: Conn) -> None:
    university.execute("UPDATE student SET university = 'Keio' WHERE first_name = 'Taro'")
    university.execute("INSERT INTO dejima_students VALUES ('Grace', 'Hopper', 'Waseda')")
    assert university.execute("SELECT count(*) FROM dejima.delta").fetchone() == (0,)


def test_the_two_members_share_the_view(university: Conn, agency: Conn) -> None:
    # agency: no filter, so every applicant is in the view; its phone stays private
    agency.execute(
        "INSERT INTO applicant (first_name, last_name, university, phone) VALUES ('Taro', 'Yamada', 'Hosei', '555')"
    )
    assert view(agency) == [TARO]
    # university's delta, put back at the agency through the view, is captured there as the same delta
    changes = captured(university, "gx-share", "UPDATE student SET university = 'Waseda' WHERE first_name = 'Nobu'")
    (insertion,) = to_deltas(changes)["dejima_students"].insertions
    assert insertion == {"first_name": "Nobu", "last_name": "Nakamura", "university": "Waseda"}
    with agency.transaction():
        register(agency, "gx-share")
        agency.execute(
            "INSERT INTO dejima_students (first_name, last_name, university)"
            " VALUES (%(first_name)s, %(last_name)s, %(university)s)",
            insertion,
        )
        forwarded = taken(agency, "gx-share")
    assert [(c.old, c.new) for c in forwarded] == [(None, insertion)]
    assert agency.execute("SELECT phone FROM applicant WHERE first_name = 'Nobu'").fetchone() == (None,)
    assert insertion in view(agency)
    assert {r["first_name"] for r in view(university)} == {"Ada", "Nobu"}


# ----------------------------------------------------------------------------------------- install rules


def test_installing_twice_is_idempotent(make_database: MakeDatabase, root: Path) -> None:
    url = make_database("pt")
    first = install(url, "university", root)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO dejima_students VALUES ('Ada', 'Lovelace', 'Keio')")
        conn.execute("INSERT INTO student (first_name, last_name, university, email) VALUES ('T', 'Y', 'Hosei', 'e')")
        objects, data = catalog(conn), students(conn)
    assert install(url, "university", root) == first
    with psycopg.connect(url, autocommit=True) as conn:
        assert catalog(conn) == objects
        assert students(conn) == data
        conn.execute("INSERT INTO dejima_students VALUES ('Grace', 'Hopper', 'Waseda')")  # the sequence goes on
        assert len(students(conn)) == 3
        assert objects["installed"] == [("university", first)]


def test_installing_a_second_peer_type_into_the_database_is_refused(make_database: MakeDatabase, root: Path) -> None:
    url = make_database("pt")
    install(url, "university", root)
    with psycopg.connect(url, autocommit=True) as conn:
        before = catalog(conn)
    with pytest.raises(InstallError, match=r"already holds peer type 'university'; one peer type per database"):
        install(url, "agency", root)
    with psycopg.connect(url, autocommit=True) as conn:
        assert catalog(conn) == before
        assert conn.execute("SELECT to_regclass('public.applicant')").fetchone() == (None,)


def test_installing_an_unknown_peer_type_is_refused(make_database: MakeDatabase, root: Path) -> None:
    with pytest.raises(InstallError, match=r"unknown peer type 'school'; known: agency, university"):
        install(make_database("pt"), "school", root)


@pytest.mark.parametrize("change", ["manifest", "generated", "missing"])
def test_installing_with_a_stale_generated_sql_is_refused(make_database: MakeDatabase, root: Path, change: str) -> None:
    folder = root / "university"
    if change == "manifest":  # the manifest changed, generated.sql was not regenerated
        manifest = folder / "manifest.toml"
        manifest.write_text(
            manifest.read_text().replace('email = "text not null"', 'email = "text not null"\nage = "integer"')
        )
    elif change == "generated":  # generated.sql edited by hand
        generated = folder / GENERATED_NAME
        generated.write_text(generated.read_text().replace("unknown@example.org", "nobody@example.org"))
    else:
        (folder / GENERATED_NAME).unlink()
    url = make_database("pt")
    with pytest.raises(
        InstallError, match=r"university/generated\.sql is missing or stale: run `python manage.py dejima_sql`"
    ):
        install(url, "university", root)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('dejima'), to_regclass('public.student')").fetchone() == (
            None,
            None,
        )


def test_hand_written_sql_runs_after_the_generated_sql(make_database: MakeDatabase, root: Path) -> None:
    (root / "university" / "extra.sql").write_text(
        "-- hand-written: uses what generated.sql created\n"
        "CREATE OR REPLACE VIEW public.hosei_count AS\n"
        "    SELECT count(*) AS n FROM public.student WHERE university = 'Hosei';\n"
    )
    url = make_database("pt")
    install(url, "university", root)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO student (first_name, last_name, university, email) VALUES ('T', 'Y', 'Hosei', 'e')")
        assert conn.execute("SELECT n FROM hosei_count").fetchone() == (1,)


def test_a_failing_hand_written_sql_installs_nothing(make_database: MakeDatabase, root: Path) -> None:
    (root / "university" / "broken.sql").write_text("CREATE VIEW public.broken AS SELECT nope FROM public.student;\n")
    url = make_database("pt")
    with pytest.raises(InstallError, match=r"broken\.sql: .*nope"):
        install(url, "university", root)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.student')").fetchone() == (None,)


LAB = """\
peer_type = "lab"

[tables.sample.columns]
name = "text not null"
g = "integer"
dejima_in_view = "boolean"
"new" = "text"
"order" = "integer"

[views.dejima_samples]
table = "sample"
columns = ["name", "g", "new", "order"]
key = ["name"]
members = ["lab"]
filter = [{ column = "dejima_in_view", op = "=", value = true }]
defaults = { dejima_in_view = true }
"""


def test_base_columns_named_like_trigger_variables_or_keywords_work(peer_db: PeerDb, root: Path) -> None:
    (root / "lab").mkdir()
    (root / "lab" / "manifest.toml").write_text(LAB)
    write_all(root)
    with psycopg.connect(peer_db("lab", root), autocommit=True) as conn:
        row = {"name": "s1", "g": 7, "new": "fresh", "order": 1}
        with conn.transaction():
            register(conn, "gx-lab")
            conn.execute(
                'INSERT INTO dejima_samples (name, g, new, "order") VALUES (%s, %s, %s, %s)', list(row.values())
            )
            conn.execute("UPDATE sample SET g = 8")
            changes = taken(conn, "gx-lab")
        assert [(c.old, c.new) for c in changes] == [(None, {**row, "g": 8})]
        assert conn.execute("SELECT dejima_in_view FROM sample").fetchone() == (True,)  # the default
        row["g"] = 8
        assert captured(conn, "gx-lab-2", 'UPDATE dejima_samples SET g = g, new = new, "order" = "order"') == []
        assert [(c.old, c.new) for c in captured(conn, "gx-lab-3", "DELETE FROM dejima_samples")] == [(row, None)]

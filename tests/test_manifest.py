"""Manifests (peer types as data): the shipped ones are valid; every malformed one stops generation with one message.

Each test builds peer type folders under tmp_path: the shipped types copied with shutil.copytree, or a small pair
`university` (table student, view dejima_students filtered on university <> 'Hosei') and `agency` (table applicant,
the same view without filter), then breaks one thing.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from peer.dejima.manifest import ManifestError, load_manifest, load_peer_types
from peer.dejima.sqlgen import GENERATED_NAME, generate_all, stale_files, write_all
from tests.helpers import AGENCY, UNIVERSITY

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = REPO_ROOT / "sql_triggers"
SHIPPED_TYPES = ("bank", "government", "insurance")


def write_types(root: Path, **manifests: str) -> Path:
    """Write one folder per peer type under root (name = keyword) holding the manifest text."""
    for name, text in manifests.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.toml").write_text(text)
    return root


def pair(tmp_path: Path, university: str = UNIVERSITY, agency: str = AGENCY) -> Path:
    return write_types(tmp_path / "types", university=university, agency=agency)


def replaced(text: str, old: str, new: str) -> str:
    assert old in text, f"test bug: {old!r} not in the manifest"
    return text.replace(old, new, 1)


def assert_rejected(root: Path, ptype: str, field: str, *fragments: str) -> ManifestError:
    """Loading (and generating from) root fails with one ManifestError naming ptype's manifest and the field."""
    with pytest.raises(ManifestError) as caught:
        load_peer_types(root)
    err = caught.value
    path = str(root / ptype / "manifest.toml")
    assert err.path == path
    assert err.field == field
    message = str(err)
    assert message.startswith(f"{path}: {field}: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in err.detail, message
    with pytest.raises(ManifestError) as again:
        generate_all(root)
    assert str(again.value) == message
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- valid manifests


def test_the_shipped_manifests_load_and_cross_check() -> None:
    types = load_peer_types(SHIPPED)
    assert sorted(types) == list(SHIPPED_TYPES)
    views = {(t.name, v.name) for t in types.values() for v in t.views}
    assert views == {
        ("government", "dejima_bank"),
        ("bank", "dejima_bank"),
        ("government", "dejima_insurance"),
        ("insurance", "dejima_insurance"),
        ("bank", "dejima_risk"),
        ("insurance", "dejima_risk"),
    }
    for ptype in types.values():
        for view in ptype.views:
            mine = view.schema_hash(ptype.table(view.table))
            for member in view.members:
                other = types[member]
                theirs = other.view(view.name)
                assert theirs.schema_hash(other.table(theirs.table)) == mine
            assert view.key == ("first_name", "last_name")
            assert not view.filter


def test_the_shipped_manifests_match_the_design() -> None:
    types = load_peer_types(SHIPPED)
    bank = types["bank"].table("bank_users")
    assert bank.column_names == ("first_name", "last_name", "iban", "address", "phone", "risk_factor")
    assert types["government"].view("dejima_insurance").columns == ("first_name", "last_name", "address", "birthdate")
    assert types["insurance"].view("dejima_risk").members == ("bank", "insurance")
    for ptype in types.values():
        for table in ptype.tables:
            assert "id" not in table.column_names  # the surrogate id is implicit


def test_a_selection_view_with_filter_and_defaults_loads(tmp_path: Path) -> None:
    types = load_peer_types(pair(tmp_path))
    view = types["university"].view("dejima_students")
    assert view.table == "student"
    assert [(c.column, c.op, c.value) for c in view.filter] == [("university", "<>", "Hosei")]
    assert view.default_for("email") == "unknown@example.org"
    student = types["university"].table("student")
    assert [(c.name, c.type, c.not_null) for c in student.columns] == [
        ("first_name", "text", True),
        ("last_name", "text", True),
        ("university", "text", False),
        ("email", "text", True),
    ]
    # the filter is local to each member: the signature (what members must agree on) ignores it
    agency = types["agency"]
    assert view.schema_hash(student) == agency.view("dejima_students").schema_hash(agency.table("applicant"))


def test_it_accepts_every_filter_op_and_column_type(tmp_path: Path) -> None:
    text = """\
peer_type = "lab"
[tables.sample.columns]
label = "text not null"
n = "integer"
big = "bigint"
amount = "numeric"
ratio = "double precision"
ok = "boolean"
taken = "date"
at = "timestamptz not null"

[views.dejima_samples]
table = "sample"
columns = ["label", "n", "ratio"]
key = ["label"]
members = ["lab"]
filter = [
  { column = "n", op = ">=", value = 1 },
  { column = "n", op = "<", value = 100 },
  { column = "big", op = "<=", value = 5 },
  { column = "ratio", op = ">", value = 0.5 },
  { column = "amount", op = "=", value = 3 },
  { column = "ok", op = "<>", value = false },
  { column = "label", op = "IN", value = ["a", "b"] },
  { column = "label", op = "not in", value = ["c"] },
  { column = "taken", op = "is not null" },
  { column = "id", op = "is null" },
]
defaults = { at = "2024-01-01T00:00:00Z", taken = "2024-01-01", ok = true }
"""
    ptype = load_manifest(write_types(tmp_path, lab=text) / "lab")
    view = ptype.view("dejima_samples")
    assert [c.op for c in view.filter] == [">=", "<", "<=", ">", "=", "<>", "in", "not in", "is not null", "is null"]
    assert view.filter[6].value == ("a", "b")
    assert ptype.table("sample").column("at").not_null  # type: ignore[union-attr]


def test_extra_sql_files_are_found_in_name_order(tmp_path: Path) -> None:
    root = pair(tmp_path)
    for name in ("b_extra.sql", "a_extra.sql", GENERATED_NAME, ".generated-leftover.sql"):
        (root / "university" / name).write_text("SELECT 1;\n")
    extra = load_manifest(root / "university").extra_sql
    assert [p.name for p in extra] == ["a_extra.sql", "b_extra.sql"]


# ----------------------------------------------------------------------------------------- views


def test_it_rejects_an_unknown_column_in_a_view(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, '"last_name", "university"]', '"last_name", "university", "nickname"]')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.columns", "'nickname'")


def test_it_rejects_the_surrogate_id_in_a_view(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'columns = ["first_name",', 'columns = ["id", "first_name",')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.columns", "'id'")


def test_it_rejects_a_declared_id_column(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'email = "text not null"', 'email = "text not null"\nid = "bigint"')
    assert_rejected(pair(tmp_path, university=bad), "university", "tables.student.columns.id", "surrogate")


def test_it_rejects_an_identity_key_not_in_the_view(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'key = ["first_name", "last_name"]', 'key = ["first_name", "email"]')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.key", "'email'", "not in")


def test_it_rejects_a_nullable_key_column(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'key = ["first_name", "last_name"]', 'key = ["last_name", "university"]')
    assert_rejected(
        pair(tmp_path, university=bad), "university", "views.dejima_students.key", "'university'", "not null"
    )


def test_it_rejects_a_duplicate_view_name(tmp_path: Path) -> None:
    twice = UNIVERSITY + '\n[views.dejima_students]\ntable = "student"\n'
    assert_rejected(pair(tmp_path, university=twice), "university", "views.dejima_students", "duplicate view name")


def test_it_rejects_a_view_named_like_a_table(tmp_path: Path) -> None:
    bad = UNIVERSITY + (
        '\n[views.student]\ntable = "student"\ncolumns = ["first_name", "last_name"]\n'
        'key = ["first_name", "last_name"]\nmembers = ["university"]\ndefaults = { email = "x" }\n'
    )
    assert_rejected(pair(tmp_path, university=bad), "university", "views.student", "table has the same name")


def test_it_rejects_a_view_named_like_the_key_index_of_another_view(tmp_path: Path) -> None:
    bad = UNIVERSITY + (
        '\n[views.dejima_students_key]\ntable = "student"\ncolumns = ["first_name", "last_name"]\n'
        'key = ["first_name", "last_name"]\nmembers = ["university"]\ndefaults = { email = "x" }\n'
    )
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students_key", "key index")


def test_it_rejects_a_view_over_an_unknown_table(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'table = "student"', 'table = "students"')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.table", "'students'")
    bad = replaced(UNIVERSITY, 'table = "student"', 'table = ["student"]')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.table")


def test_it_rejects_a_view_without_its_own_peer_type_as_member(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'members = ["university", "agency"]', 'members = ["agency"]')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.members", "'university'")


# ----------------------------------------------------------------------------------------- members (cross-manifest)

ALUMNI = """
[views.dejima_alumni]
table = "student"
columns = ["first_name", "last_name", "email"]
key = ["first_name", "last_name"]
members = {members}
"""


def test_it_rejects_a_member_type_that_does_not_exist(tmp_path: Path) -> None:
    bad = UNIVERSITY + ALUMNI.format(members='["university", "school"]')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_alumni.members", "'school'", "exist")


def test_it_rejects_a_member_that_does_not_declare_the_view(tmp_path: Path) -> None:
    bad = UNIVERSITY + ALUMNI.format(members='["university", "agency"]')
    assert_rejected(
        pair(tmp_path, university=bad), "university", "views.dejima_alumni.members", "'agency'", "dejima_alumni"
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(
            'columns = ["first_name", "last_name", "university"]', 'columns = ["first_name", "last_name"]', id="columns"
        ),
        pytest.param(
            'columns = ["first_name", "last_name", "university"]',
            'columns = ["last_name", "first_name", "university"]',
            id="column-order",
        ),
        pytest.param('university = "text"', 'university = "integer"', id="types"),
        pytest.param('key = ["first_name", "last_name"]', 'key = ["first_name"]', id="key"),
        pytest.param('members = ["university", "agency"]', 'members = ["university", "agency", "bank"]', id="members"),
    ],
)
def test_it_rejects_members_that_disagree_on_a_view(tmp_path: Path, old: str, new: str) -> None:
    root = pair(tmp_path, agency=replaced(AGENCY, old, new))
    assert_rejected(root, "agency", "views.dejima_students", "differs from university", "columns, types, key")


# ----------------------------------------------------------------------------------------- filter and defaults


def test_it_rejects_a_filter_on_a_column_that_does_not_exist(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'column = "university"', 'column = "faculty"')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.filter[0].column", "'faculty'")


@pytest.mark.parametrize("op", ["like", "==", "!=", "<> 'x' OR TRUE --", ""])
def test_it_rejects_a_bad_filter_op(tmp_path: Path, op: str) -> None:
    bad = replaced(UNIVERSITY, 'op = "<>"', f'op = "{op}"')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.filter[0].op", "is not one of")


@pytest.mark.parametrize(
    ("condition", "field", "fragment"),
    [
        ('{ column = "university", op = "=" }', "value", "needs a value"),
        ('{ column = "university", op = "is null", value = "x" }', "value", "takes no value"),
        ('{ column = "university", op = "in", value = "Keio" }', "value", "non-empty list"),
        ('{ column = "university", op = "not in", value = [] }', "value", "non-empty list"),
        ('{ column = "university", op = "=", value = 3 }', "value", "does not fit type text"),
        ('{ column = "university", op = "in", value = ["Keio", 3] }', "value", "does not fit type text"),
        ('{ column = "id", op = ">", value = "1" }', "value", "does not fit type bigint"),
        ('{ column = "university", op = "=", value = "x", negate = true }', "negate", "unknown field"),
    ],
)
def test_it_rejects_a_malformed_filter_condition(tmp_path: Path, condition: str, field: str, fragment: str) -> None:
    bad = replaced(UNIVERSITY, '{ column = "university", op = "<>", value = "Hosei" }', condition)
    assert_rejected(pair(tmp_path, university=bad), "university", f"views.dejima_students.filter[0].{field}", fragment)


def test_it_rejects_a_filter_that_is_not_a_list(tmp_path: Path) -> None:
    bad = replaced(
        UNIVERSITY,
        'filter = [{ column = "university", op = "<>", value = "Hosei" }]',
        "filter = \"university <> 'Hosei'\"",
    )
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.filter", "list")


def test_it_rejects_a_default_for_a_column_the_view_carries(tmp_path: Path) -> None:
    bad = replaced(
        UNIVERSITY, 'defaults = { email = "unknown@example.org" }', 'defaults = { email = "x", university = "Keio" }'
    )
    assert_rejected(
        pair(tmp_path, university=bad), "university", "views.dejima_students.defaults.university", "carries"
    )


def test_it_rejects_a_default_for_an_unknown_column(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'defaults = { email = "unknown@example.org" }', 'defaults = { email = "x", age = 3 }')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.defaults.age", "'age'")


def test_it_rejects_a_default_of_the_wrong_type(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'email = "text not null"', 'email = "text not null"\nyear = "integer"')
    bad = replaced(bad, 'defaults = { email = "unknown@example.org" }', 'defaults = { email = "x", year = "2024" }')
    assert_rejected(pair(tmp_path, university=bad), "university", "views.dejima_students.defaults.year", "integer")


def test_it_rejects_a_not_null_column_outside_the_view_without_default(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'defaults = { email = "unknown@example.org" }\n', "")
    assert_rejected(
        pair(tmp_path, university=bad), "university", "views.dejima_students.defaults", "'email'", "NOT NULL"
    )


# ----------------------------------------------------------------------------------------- tables, fields, names


@pytest.mark.parametrize("spec", ["varchar(20)", "text null", "string", "int not null not null", ""])
def test_it_rejects_an_unknown_type(tmp_path: Path, spec: str) -> None:
    bad = replaced(UNIVERSITY, 'university = "text"', f'university = "{spec}"')
    assert_rejected(pair(tmp_path, university=bad), "university", "tables.student.columns.university", "unknown type")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('description = "A university', 'owner = "me"\ndescription = "A university', "owner"),
        (
            "[tables.student.columns]",
            '[tables.student]\nprimary = "id"\n[tables.student.columns]',
            "tables.student.primary",
        ),
        (
            'key = ["first_name", "last_name"]',
            'key = ["first_name", "last_name"]\nunique = true',
            "views.dejima_students.unique",
        ),
        (
            'members = ["university", "agency"]',
            'members = ["university", "agency"]\ncolums = ["x"]',
            "views.dejima_students.colums",
        ),
    ],
)
def test_it_rejects_an_unknown_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert_rejected(pair(tmp_path, university=replaced(UNIVERSITY, old, new)), "university", field, "unknown field")


def test_it_rejects_a_peer_type_that_does_not_match_its_folder(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'peer_type = "university"', 'peer_type = "college"')
    assert_rejected(pair(tmp_path, university=bad), "university", "peer_type", "'college'", "'university'")


def test_it_rejects_a_manifest_without_tables(tmp_path: Path) -> None:
    root = write_types(tmp_path, empty='peer_type = "empty"\n')
    assert_rejected(root, "empty", "tables", "at least one")


def test_it_rejects_a_folder_without_manifest(tmp_path: Path) -> None:
    root = pair(tmp_path)
    (root / "notes").mkdir()
    with pytest.raises(ManifestError, match="missing") as caught:
        load_peer_types(root)
    assert caught.value.path == str(root / "notes" / "manifest.toml")


def test_it_rejects_a_toml_syntax_error(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'university = "text"', "university = text")
    assert_rejected(pair(tmp_path, university=bad), "university", "(syntax)")


INJECTION = 'x\\"; DROP TABLE student; --'


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("[tables.student.columns]", "[tables.Student.columns]", "tables.Student"),
        ('first_name = "text not null"', 'FirstName = "text not null"', "tables.student.columns.FirstName"),
        ("[views.dejima_students]", "[views.Dejima_Students]", "views.Dejima_Students"),
        ('peer_type = "university"', 'peer_type = "University"', "peer_type"),
        ("[tables.student.columns]", f'[tables."{INJECTION}".columns]', 'tables.x"; DROP TABLE student; --'),
        (
            'email = "text not null"',
            f'email = "text not null"\n"{INJECTION}" = "text"',
            'tables.student.columns.x"; DROP TABLE student; --',
        ),
        ("[views.dejima_students]", f'[views."{INJECTION}"]', 'views.x"; DROP TABLE student; --'),
        (
            'members = ["university", "agency"]',
            f'members = ["university", "agency", "{INJECTION}"]',
            "views.dejima_students.members",
        ),
        ('peer_type = "university"', f'peer_type = "{INJECTION}"', "peer_type"),
        ("[tables.student.columns]", "[tables.a-b.columns]", "tables.a-b"),
        ("[tables.student.columns]", "[tables.1student.columns]", "tables.1student"),
        ("[tables.student.columns]", f"[tables.{'s' * 49}.columns]", f"tables.{'s' * 49}"),
    ],
)
def test_it_rejects_a_bad_name(tmp_path: Path, old: str, new: str, field: str) -> None:
    err = assert_rejected(
        pair(tmp_path, university=replaced(UNIVERSITY, old, new)), "university", field, "not a valid name"
    )
    assert "lower-case" in err.detail


def test_it_rejects_a_value_holding_the_dollar_quote_tag(tmp_path: Path) -> None:
    bad = replaced(UNIVERSITY, 'value = "Hosei"', 'value = "Hosei$dejima$; DROP TABLE student; --"')
    root = pair(tmp_path, university=bad)
    load_peer_types(root)  # a valid manifest...
    with pytest.raises(ManifestError) as caught:  # ...that the generator refuses to quote
        generate_all(root)
    assert caught.value.path == str(root / "university" / "manifest.toml")
    assert caught.value.field == "views.dejima_students"
    assert "$dejima$" in caught.value.detail


# ----------------------------------------------------------------------------------------- nothing half-generated


def several_types_with_one_broken(tmp_path: Path) -> Path:
    root = tmp_path / "types"
    shutil.copytree(SHIPPED, root)
    for name in SHIPPED_TYPES:
        (root / name / GENERATED_NAME).unlink()
    (root / "government" / GENERATED_NAME).write_text("-- an old generated file\n")
    bad = replaced(UNIVERSITY, 'column = "university"', 'column = "faculty"')
    return write_types(root, university=bad, agency=AGENCY)


def test_it_writes_no_file_when_one_manifest_among_several_is_bad(tmp_path: Path) -> None:
    root = several_types_with_one_broken(tmp_path)
    before = snapshot(root)
    with pytest.raises(ManifestError, match=r"university/manifest\.toml: views\.dejima_students\.filter\[0\]\.column"):
        write_all(root)
    assert snapshot(root) == before
    assert not list(root.rglob(".generated-*"))


def test_write_all_writes_every_type_once_the_manifests_are_valid(tmp_path: Path) -> None:
    root = several_types_with_one_broken(tmp_path)
    write_types(root, university=UNIVERSITY)
    written = write_all(root)
    assert sorted(p.parent.name for p in written) == ["agency", "bank", "government", "insurance", "university"]
    for name in SHIPPED_TYPES:
        assert (root / name / GENERATED_NAME).read_text() == (SHIPPED / name / GENERATED_NAME).read_text()
    assert stale_files(root) == []
    before = snapshot(root)
    assert write_all(root) == []  # idempotent: an up-to-date file is not rewritten
    assert snapshot(root) == before
    assert not list(root.rglob(".generated-*"))


def test_stale_files_finds_a_stale_and_a_missing_generated_sql(tmp_path: Path) -> None:
    root = tmp_path / "types"
    shutil.copytree(SHIPPED, root)
    assert stale_files(root) == []
    stale = root / "bank" / GENERATED_NAME
    stale.write_text(stale.read_text().replace("risk_factor", "risk"))
    (root / "insurance" / GENERATED_NAME).unlink()
    assert sorted(stale_files(root)) == [stale, root / "insurance" / GENERATED_NAME]


def test_stale_files_finds_a_manifest_changed_without_regenerating(tmp_path: Path) -> None:
    root = pair(tmp_path)
    write_all(root)
    manifest = root / "agency" / "manifest.toml"
    manifest.write_text(replaced(AGENCY, 'phone = "text"', 'phone = "text"\nnotes = "text"'))
    assert stale_files(root) == [root / "agency" / GENERATED_NAME]


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run_dejima_sql(*args: str) -> Outcome:
    """`python manage.py dejima_sql ARGS`, in process: exit status, stdout and the error a user sees."""
    out = io.StringIO()
    try:
        call_command("dejima_sql", *args, stdout=out, stderr=io.StringIO())
    except CommandError as exc:
        return Outcome(exc.returncode, out.getvalue(), f"CommandError: {exc}")
    return Outcome(0, out.getvalue(), "")


def test_dejima_sql_check_fails_on_a_stale_or_missing_file_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "types"
    shutil.copytree(SHIPPED, root)
    stale = root / "bank" / GENERATED_NAME
    stale.write_text(stale.read_text() + "-- edited by hand\n")
    (root / "government" / GENERATED_NAME).unlink()
    before = snapshot(root)
    result = run_dejima_sql("--root", str(root), "--check")
    assert result.returncode != 0
    assert "stale" in result.stderr
    assert str(stale) in result.stderr
    assert str(root / "government" / GENERATED_NAME) in result.stderr
    assert snapshot(root) == before

    fixed = run_dejima_sql("--root", str(root))
    assert fixed.returncode == 0, fixed.stderr
    assert "wrote" in fixed.stdout
    ok = run_dejima_sql("--root", str(root), "--check")
    assert ok.returncode == 0, ok.stderr
    assert "up to date" in ok.stdout


def test_dejima_sql_stops_with_one_message_naming_file_and_field(tmp_path: Path) -> None:
    root = several_types_with_one_broken(tmp_path)
    before = snapshot(root)
    for args in (("--check",), ()):
        result = run_dejima_sql("--root", str(root), *args)
        assert result.returncode != 0
        expected = f"{root / 'university' / 'manifest.toml'}: views.dejima_students.filter[0].column: 'faculty'"
        assert expected in result.stderr
        assert result.stderr.count("manifest.toml") == 1
    assert snapshot(root) == before

"""Schema migrations over PRAGMA user_version, on plain sqlite3 connections (no event loop)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox.errors import SchemaTooNewError, StoreError
from outbox.storage import schema
from outbox.storage.schema import Migration


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "schema.db", isolation_level=None)
    yield connection
    connection.close()


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")
    return {name for (name,) in rows if not name.startswith("sqlite_")}


# -- the shipped migrations ------------------------------------------------------------------


def test_shipped_migrations_are_numbered_from_one_without_gaps() -> None:
    found = schema.available()
    assert found, "no migrations found in outbox.migrations"
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(m.name.startswith(f"{m.version:04d}_") and m.name.endswith(".sql") for m in found)
    assert all(schema.statements(m.sql) for m in found)
    assert schema.latest_version() == len(found)


def test_migrate_creates_the_schema_on_a_fresh_database(conn: sqlite3.Connection) -> None:
    assert schema.migrate(conn) == schema.latest_version()
    assert user_version(conn) == schema.latest_version()
    assert {"outbox", "outbox_meta", "outbox_pending", "outbox_acked"} <= tables(conn)
    assert not conn.in_transaction
    conn.execute("INSERT INTO outbox (payload, created_at, updated_at) VALUES ('1', 0, 0)")
    row = conn.execute("SELECT id, status, attempts, key FROM outbox").fetchone()
    assert row == (1, "pending", 0, None)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO outbox (payload, status, created_at, updated_at) "
            "VALUES ('1', 'sent', 0, 0)"
        )


def test_ids_are_never_reused_after_deleting_every_row(conn: sqlite3.Connection) -> None:
    schema.migrate(conn)
    insert = "INSERT INTO outbox (payload, created_at, updated_at) VALUES ('x', 0, 0)"
    conn.execute(insert)
    conn.execute(insert)
    conn.execute("DELETE FROM outbox")
    assert conn.execute(insert).lastrowid == 3


def test_migrate_twice_is_a_no_op(conn: sqlite3.Connection) -> None:
    schema.migrate(conn)
    conn.execute("INSERT INTO outbox (payload, created_at, updated_at) VALUES ('kept', 0, 0)")
    assert schema.migrate(conn) == schema.latest_version()
    assert conn.execute("SELECT payload FROM outbox").fetchall() == [("kept",)]


def test_a_second_connection_sees_the_migration_and_skips_it(tmp_path: Path) -> None:
    first = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
    second = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
    try:
        schema.migrate(first)
        assert schema.migrate(second) == schema.latest_version()
    finally:
        first.close()
        second.close()


def test_a_newer_schema_is_refused_and_left_untouched(conn: sqlite3.Connection) -> None:
    newer = schema.latest_version() + 1
    conn.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(SchemaTooNewError, match=rf"mine\.db.*version {newer}") as caught:
        schema.migrate(conn, "mine.db")
    assert isinstance(caught.value, StoreError)
    assert "upgrade" in str(caught.value)
    assert user_version(conn) == newer
    assert tables(conn) == set()
    assert not conn.in_transaction


# -- the runner, with made-up migrations -----------------------------------------------------


def use_migrations(monkeypatch: pytest.MonkeyPatch, *sqls: str) -> None:
    fake = [Migration(n, f"{n:04d}_step.sql", sql) for n, sql in enumerate(sqls, start=1)]
    monkeypatch.setattr(schema, "available", lambda: fake)


def test_steps_apply_in_order_and_set_the_version(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_migrations(
        monkeypatch,
        "CREATE TABLE a (x INTEGER);\n",
        "ALTER TABLE a ADD COLUMN y TEXT;\nCREATE TABLE b (z);\n",
    )
    assert schema.migrate(conn) == 2
    assert user_version(conn) == 2
    assert [c[1] for c in conn.execute("PRAGMA table_info(a)")] == ["x", "y"]
    assert tables(conn) == {"a", "b"}


def test_a_failing_step_rolls_back_whole_and_keeps_the_previous_version(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    step1 = "CREATE TABLE a (x);\n"
    broken = "CREATE TABLE b (y);\nINSERT INTO a VALUES (1);\nINSERT INTO nowhere VALUES (1);\n"
    use_migrations(monkeypatch, step1, broken)
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        schema.migrate(conn)
    assert user_version(conn) == 1
    assert tables(conn) == {"a"}
    assert conn.execute("SELECT count(*) FROM a").fetchone() == (0,)
    assert not conn.in_transaction

    # Fixed: only step 2 runs (step 1 again would fail on CREATE TABLE a).
    use_migrations(monkeypatch, step1, "CREATE TABLE b (y);\nINSERT INTO a VALUES (1);\n")
    assert schema.migrate(conn) == 2
    assert tables(conn) == {"a", "b"}
    assert conn.execute("SELECT count(*) FROM a").fetchone() == (1,)


def test_available_refuses_gaps_and_ignores_other_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (x);\n", "utf-8")
    (tmp_path / "README.md").write_text("not a migration", "utf-8")
    (tmp_path / "__init__.py").write_text("", "utf-8")
    (tmp_path / "0002_Bad-Name.sql").write_text("nonsense", "utf-8")
    monkeypatch.setattr(schema.resources, "files", lambda package: tmp_path)
    assert [m.name for m in schema.available()] == ["0001_first.sql"]

    (tmp_path / "0003_third.sql").write_text("CREATE TABLE c (x);\n", "utf-8")
    with pytest.raises(RuntimeError, match=r"without gaps: \[1, 3\]"):
        schema.available()


# -- statements() ----------------------------------------------------------------------------


def test_statements_splits_a_script_at_statement_ends_only(conn: sqlite3.Connection) -> None:
    sql = (
        "-- header comment; with a semicolon\n"
        "CREATE TABLE a (\n"
        "    x TEXT DEFAULT 'a;b',\n"
        "    y INTEGER\n"
        ");\n"
        "\n"
        "CREATE INDEX a_x ON a (x); -- trailing comment\n"
        "/* a block; comment */\n"
        "INSERT INTO a (y) VALUES (1); INSERT INTO a VALUES ('--;', 2);\n"
        "-- footer comment\n"
    )
    result = schema.statements(sql)
    assert len(result) == 4, result
    assert all(sqlite3.complete_statement(s) and s == s.strip() for s in result)
    assert "DEFAULT 'a;b'" in result[0]
    assert result[0].endswith(");")
    assert result[1].endswith("CREATE INDEX a_x ON a (x);")
    assert result[2].endswith("INSERT INTO a (y) VALUES (1);")
    assert result[3] == "INSERT INTO a VALUES ('--;', 2);"
    for statement in result:
        conn.execute(statement)  # one statement each, or sqlite3 refuses
    assert conn.execute("SELECT x, y FROM a ORDER BY y").fetchall() == [("a;b", 1), ("--;", 2)]


def test_statements_keeps_a_trigger_body_whole() -> None:
    sql = (
        "CREATE TRIGGER t AFTER INSERT ON a BEGIN\n"
        "    UPDATE a SET x = 1;\n"
        "    UPDATE a SET x = 2;\n"
        "END;\n"
    )
    assert schema.statements(sql) == [sql.strip()]


def test_statements_of_the_empty_script() -> None:
    assert schema.statements("") == []
    assert schema.statements("\n-- only a comment\n\n") == []


def test_statements_refuses_an_unfinished_statement() -> None:
    with pytest.raises(ValueError, match="incomplete SQL statement"):
        schema.statements("CREATE TABLE a (x);\nCREATE TABLE b (y)\n")


def test_every_split_statement_runs_on_its_own(conn: sqlite3.Connection) -> None:
    for migration in schema.available():
        for statement in schema.statements(migration.sql):
            assert sqlite3.complete_statement(statement)
            conn.execute(statement)  # raises if it held two statements


def test_statements_splits_two_statements_on_one_line(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql = "CREATE TABLE a (x); CREATE TABLE b (y);\n"
    use_migrations(monkeypatch, sql)
    assert schema.statements(sql) == ["CREATE TABLE a (x);", "CREATE TABLE b (y);"]
    assert schema.migrate(conn) == 1


def test_statements_accepts_a_trailing_block_comment() -> None:
    assert schema.statements("CREATE TABLE a (x);\n/* the end */\n") == ["CREATE TABLE a (x);"]


def test_migrations_are_read_from_inside_the_package() -> None:
    """A source checkout and an installed wheel read the same files: they live inside the
    package (outbox/storage/migrations), not beside it, so no install mapping is needed."""
    import outbox

    folder = Path(outbox.__file__).resolve().parent / "storage" / "migrations"
    on_disk = sorted(path.name for path in folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert [m.name for m in schema.available()] == on_disk
    assert on_disk and on_disk[0].startswith("0001_")

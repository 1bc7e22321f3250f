"""The jobs' tables in one SQLite file: each owner's schema made and migrated on its own, errors that say why."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ember.conversations.db import Database
from ember.jobs.database import JobsDatabase, JobsDatabaseError


def test_owners_share_a_file_and_migrate_their_own_tables(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    first = JobsDatabase(path, "alpha", ["CREATE TABLE alpha (x INTEGER)"])
    other = JobsDatabase(path, "beta", ["CREATE TABLE beta (y TEXT); CREATE INDEX beta_y ON beta (y)"])
    with first.transaction() as db:
        db.execute("INSERT INTO alpha VALUES (1)")
    with other.transaction() as db:
        db.execute("INSERT INTO beta VALUES ('b')")
    # a later ember adds a migration for alpha: only the new step runs, beta is left alone
    upgraded = JobsDatabase(path, "alpha", ["CREATE TABLE alpha (x INTEGER)", "ALTER TABLE alpha ADD COLUMN z TEXT"])
    with upgraded.connect() as db:
        assert [tuple(row) for row in db.execute("SELECT x, z FROM alpha")] == [(1, None)]
        versions = dict(db.execute("SELECT component, version FROM schema_versions").fetchall())
        assert versions == {"alpha": 2, "beta": 1}
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    database = JobsDatabase(tmp_path / "ember.db", "alpha", ["CREATE TABLE alpha (x INTEGER)"])
    with pytest.raises(RuntimeError), database.transaction() as db:
        db.execute("INSERT INTO alpha VALUES (1)")
        raise RuntimeError("stop")
    with database.connect() as db:
        assert db.execute("SELECT count(*) FROM alpha").fetchone()[0] == 0


def test_a_newer_schema_and_a_damaged_file_are_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    with JobsDatabase(path, "alpha", ["CREATE TABLE a (x)", "CREATE TABLE b (y)"]).connect():
        pass
    with (
        pytest.raises(JobsDatabaseError, match="upgrade ember"),
        JobsDatabase(path, "alpha", ["CREATE TABLE a (x)"]).connect(),
    ):
        pass
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JobsDatabaseError, match="move it away"), JobsDatabase(damaged, "alpha", []).connect():
        pass


def test_versions_kept_in_the_old_jobs_table_carry_over(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    with sqlite3.connect(path) as db:  # a file written when the jobs kept their versions apart
        db.execute("CREATE TABLE jobs_schema_versions (owner TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        db.execute("INSERT INTO jobs_schema_versions VALUES ('alpha', 1)")
        db.execute("CREATE TABLE alpha (x INTEGER)")
    upgraded = JobsDatabase(path, "alpha", ["CREATE TABLE alpha (x INTEGER)", "ALTER TABLE alpha ADD COLUMN z TEXT"])
    with upgraded.connect() as db:  # only the second step runs: the first would fail on the existing table
        assert [row[1] for row in db.execute("PRAGMA table_info(alpha)")] == ["x", "z"]
        assert dict(db.execute("SELECT component, version FROM schema_versions").fetchall()) == {"alpha": 2}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "jobs_schema_versions" not in tables


def test_a_conversation_store_and_the_jobs_share_one_version_table(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    with Database(path).connect():
        pass
    with JobsDatabase(path, "alpha", ["CREATE TABLE alpha (x INTEGER)"]).connect() as db:
        versions = dict(db.execute("SELECT component, version FROM schema_versions").fetchall())
    assert versions == {"conversations": 1, "alpha": 1}

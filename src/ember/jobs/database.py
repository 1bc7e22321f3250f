"""The jobs' tables in EMBER_HOME/ember.db (ember/database.py): batch files and batches, the worker's request
ledger, schedules. Each owner passes its name and its own list of migrations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ember.database import DatabaseError, Migration, SharedDatabase


class JobsDatabaseError(DatabaseError):
    """The jobs' tables cannot be used (a damaged database, a newer schema, an unwritable folder)."""


class JobsDatabase(SharedDatabase):
    """One job owner's tables in the SQLite file at `path` (default: EMBER_HOME/ember.db)."""

    def __init__(self, path: str | Path | None, owner: str, migrations: Sequence[Migration]) -> None:
        super().__init__(path, owner, migrations, error=JobsDatabaseError)

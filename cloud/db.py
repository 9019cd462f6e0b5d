"""Persistence with peewee: SQLite file by default, PostgreSQL by URL.

``open_database`` returns the database and binds the models to it; the cloud's domain objects
are handed that database (for their transactions) rather than reaching for a global.  One
process serves one database, as ``fedmq cloud`` does.

The program owns its schema: ``open_database`` creates it on first use and applies any pending
migration, recording the version in ``schema_version`` -- nobody deletes database files by hand
(AGATA's README asked users to before every run).  New migrations are appended to ``MIGRATIONS``
and use ``playhouse.migrate``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peewee import (
    AutoField,
    BooleanField,
    CharField,
    CompositeKey,
    Database,
    Field,
    FloatField,
    ImproperlyConfigured,
    IntegerField,
    Model,
    SqliteDatabase,
    TextField,
)
from playhouse.db_url import connect
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_schema

log = logging.getLogger("fedmq.cloud.db")

class JSONField(TextField):
    """JSON in a text column: portable across SQLite and PostgreSQL."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class BaseModel(Model):
    """Bound to a database by ``open_database``."""


class SchemaVersion(BaseModel):
    version = IntegerField()
    applied_at = FloatField(default=time.time)


class Device(BaseModel):
    id = CharField(primary_key=True, max_length=128)
    info = JSONField(default=dict)
    online = BooleanField(default=False)
    session = IntegerField(default=0)
    last_seen = FloatField(null=True)
    disconnections = IntegerField(default=0)
    first_seen = FloatField(default=time.time)
    info_updated = FloatField(null=True)


class Task(BaseModel):
    id = CharField(primary_key=True, max_length=128)
    name = CharField(max_length=128)
    bundle = CharField(max_length=64)
    state = CharField(max_length=16, default="created", index=True)
    revision = IntegerField(default=1)
    criteria = TextField(default="")
    requirements = JSONField(default=dict)
    args = JSONField(default=dict)
    tags = JSONField(default=list)
    priority = IntegerField(default=0)
    flower_host = CharField(max_length=255)
    flower_port = IntegerField(null=True)
    auto_port = BooleanField(default=True)
    created = FloatField(default=time.time)
    updated = FloatField(default=time.time)
    started_at = FloatField(null=True)
    finished_at = FloatField(null=True)
    current_round = IntegerField(default=0)
    total_rounds = IntegerField(null=True)
    last_error = TextField(null=True)
    metrics = JSONField(default=dict)
    server_pid = IntegerField(null=True)
    server_started = TextField(null=True)  # the server process's identity, so a reused pid is never signalled
    run = IntegerField(default=0)
    owner = CharField(max_length=128, null=True)  # the replica whose host runs the Flower server
    lifecycle = JSONField(default=dict)  # what happens to a finished run's model: {model, register_if}
    selection = CharField(max_length=16, default="cloud")  # where its criteria are evaluated (SelectionMode)


class TaskDevice(BaseModel):
    """Which devices a task was offered to or ran on, so a stop reaches them."""

    task = CharField(max_length=128)
    device = CharField(max_length=128)
    state = CharField(max_length=16)
    updated = FloatField(default=time.time)

    class Meta:
        primary_key = CompositeKey("task", "device")


class Principal(BaseModel):
    """Who may connect and call, with which role (the broker holds the passwords)."""

    name = CharField(primary_key=True, max_length=128)
    role = CharField(max_length=16)
    clientid = CharField(max_length=128, null=True)  # the one client id it may connect with
    created = FloatField(default=time.time)
    rotated = FloatField(null=True)


class Event(BaseModel):
    id = AutoField()
    ts = FloatField(index=True)
    component = CharField(max_length=128)
    kind = CharField(max_length=64, index=True)
    task = CharField(max_length=128, null=True, index=True)
    device = CharField(max_length=128, null=True)
    run = IntegerField(null=True)
    data = JSONField(default=dict)


class ModelVersion(BaseModel):
    """A registered model: NAME:VERSION, the run it came from (its lineage, frozen at registration)
    and that run's final metrics.  The file itself lives under ``<home>/models/<name>/<version>/``."""

    name = CharField(max_length=128)
    version = IntegerField()
    task = CharField(max_length=128)
    run = IntegerField()
    sha256 = CharField(max_length=64)
    size = IntegerField()
    metrics = JSONField(default=dict)
    lineage = JSONField(default=dict)
    note = TextField(default="")
    created = FloatField(default=time.time)
    created_by = CharField(max_length=128, default="")

    class Meta:
        primary_key = CompositeKey("name", "version")


class Deployment(BaseModel):
    """One roll-out of NAME:VERSION to the devices its criteria select, stage by stage."""

    id = CharField(primary_key=True, max_length=128)
    name = CharField(max_length=128)
    version = IntegerField()
    criteria = TextField(default="")
    stages = JSONField(default=list)          # cumulative fractions of the selected devices, e.g. [0.05, 0.25, 1.0]
    max_failure_rate = FloatField(default=0.0)
    health = TextField(default="")            # an expression over what the device's [deploy] entry point reports
    stage_timeout_s = FloatField(default=600.0)
    signature = TextField(null=True)          # the operator's Ed25519 signature over the model's identity
    key_id = CharField(max_length=32, null=True)
    state = CharField(max_length=16, index=True)
    stage = IntegerField(default=0)           # index into stages of the stage under way
    stage_started = FloatField(null=True)
    reason = TextField(default="")            # why it is in its state (the last decision)
    created = FloatField(default=time.time)
    updated = FloatField(default=time.time)
    created_by = CharField(max_length=128, default="")


class DeploymentDevice(BaseModel):
    """A device a deployment chose, the stage that chose it, what it had before, what it reported."""

    deployment = CharField(max_length=128)
    device = CharField(max_length=128)
    stage = IntegerField()
    state = CharField(max_length=16)          # sent | healthy | unhealthy | rolled_back
    previous = IntegerField(null=True)        # the version of the model it had (None: none)
    metrics = JSONField(default=dict)
    error = TextField(null=True)
    updated = FloatField(default=time.time)

    class Meta:
        primary_key = CompositeKey("deployment", "device")


class DeviceModel(BaseModel):
    """The desired state: which version of each model a device should run (the cloud publishes it
    retained on ``devices/<device>/models``, so a device that was offline gets it on return) and
    which version it last said it runs."""

    device = CharField(max_length=128)
    name = CharField(max_length=128)
    version = IntegerField()                  # desired
    deployment = CharField(max_length=128, null=True)
    installed = IntegerField(null=True)       # reported
    updated = FloatField(default=time.time)

    class Meta:
        primary_key = CompositeKey("device", "name")


MODELS = [SchemaVersion, Device, Task, TaskDevice, Principal, Event, ModelVersion, Deployment, DeploymentDevice,
          DeviceModel]


def write_transaction(db: Database) -> Any:
    """A transaction that reads then writes.  On SQLite it takes the write lock up front: a
    deferred transaction that upgrades from reading to writing fails at once with "database is
    locked" when another writer got in between, whatever the busy timeout."""
    if isinstance(db, SqliteDatabase):
        return db.atomic(lock_type="IMMEDIATE")
    return db.atomic()


def insert_rows(model: type[BaseModel], fields: list[Field], rows: list[tuple[Any, ...]], *,
                conflict_target: list[Field] | None = None, preserve: list[Field] | None = None) -> None:
    """Many rows in one multi-row statement whose SQL is rendered once per row count.  Rendering
    15 rows of SQL in peewee cost ten times what writing them did, on the path of every device's
    first request; and one statement, not the driver's executemany, because SQLite's driver
    gives up the GIL at every row it steps (and waits to get it back behind busy threads)."""
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start:start + INSERT_CHUNK]
        database = model._meta.database
        key = (model, database, tuple(fields), tuple(conflict_target or ()), tuple(preserve or ()), len(chunk))
        sql = _INSERT_SQL.get(key)
        if sql is None:
            query = model.insert_many(chunk, fields=fields).returning()  # no RETURNING: ids unused
            if conflict_target:
                query = query.on_conflict(conflict_target=conflict_target, preserve=preserve)
            sql, params = query.sql()
            if len(params) != len(fields) * len(chunk):  # a default peewee added would shift values
                raise RuntimeError(f"insert into {model.__name__} binds {len(params)} values "
                                   f"for {len(chunk)} rows of {len(fields)} fields")
            _INSERT_SQL[key] = sql
        database.execute_sql(sql, [field.db_value(value) for row in chunk
                                   for field, value in zip(fields, row, strict=True)])


INSERT_CHUNK = 100  # rows per statement: well inside SQLite's 32,766 bound values
_INSERT_SQL: dict[tuple[Any, ...], str] = {}  # rendered once per table, fields, database and row count


def _v1(db: Database) -> None:
    db.create_tables([Device, Task, TaskDevice, Event])


def _v2(db: Database) -> None:
    """Identities and roles; the recorded identity of a task's server process."""
    db.create_tables([Principal])
    # _v1 builds tables from today's models, so a database created fresh already has the column.
    if "server_started" not in {column.name for column in db.get_columns("task")}:
        migrator = SchemaMigrator.from_database(db)
        migrate_schema(migrator.add_column("task", "server_started", TextField(null=True)))


def _v3(db: Database) -> None:
    """The replica that owns a running task's Flower server."""
    if "owner" not in {column.name for column in db.get_columns("task")}:
        migrator = SchemaMigrator.from_database(db)
        migrate_schema(migrator.add_column("task", "owner", CharField(max_length=128, null=True)))


def _v4(db: Database) -> None:
    """The model lifecycle: registered models, deployments, each device's desired models; a task's
    lifecycle policy."""
    db.create_tables([ModelVersion, Deployment, DeploymentDevice, DeviceModel])
    if "lifecycle" not in {column.name for column in db.get_columns("task")}:
        migrator = SchemaMigrator.from_database(db)
        migrate_schema(migrator.add_column("task", "lifecycle", JSONField(default=dict)))


def _v5(db: Database) -> None:
    """Where a task's criteria are evaluated: in the cloud, or by the device (privacy mode)."""
    if "selection" not in {column.name for column in db.get_columns("task")}:
        migrator = SchemaMigrator.from_database(db)
        migrate_schema(migrator.add_column("task", "selection", CharField(max_length=16, default="cloud")))


MIGRATIONS: list[Callable[[Database], None]] = [_v1, _v2, _v3, _v4, _v5]
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(db: Database) -> int:
    if not db.table_exists("schemaversion"):
        return 0
    row = SchemaVersion.select().order_by(SchemaVersion.version.desc()).first()
    return row.version if row else 0


def migrate(db: Database) -> int:
    """Apply pending migrations in one transaction each; returns the resulting version."""
    db.create_tables([SchemaVersion])
    version = current_version(db)
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"database schema v{version} is newer than this fedmq (v{SCHEMA_VERSION}); upgrade fedmq")
    for number in range(version + 1, SCHEMA_VERSION + 1):
        with db.atomic():
            MIGRATIONS[number - 1](db)
            SchemaVersion.create(version=number)
        log.info("database migrated to schema v%d", number)
    return SCHEMA_VERSION


def open_database(url: str | None, home: Path) -> Database:
    """``url``: ``sqlite:///path.db`` or ``postgresql://user@host:port/db``; default
    ``<home>/fedmq.db``."""
    if not url:
        home.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{home / 'fedmq.db'}"
    if url.startswith("sqlite"):
        db = connect(url, pragmas={"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1,
                                  "busy_timeout": 5000},
                     check_same_thread=False)
    else:
        try:
            db = connect(url)
        except ImproperlyConfigured:
            raise RuntimeError(f"the database URL {url.split('@')[-1]!r} needs a driver: "
                               "pip install 'fedmq[postgres]'") from None
    db.bind(MODELS, bind_refs=False, bind_backrefs=False)
    try:
        db.connect(reuse_if_open=True)
    except ImproperlyConfigured:
        raise RuntimeError(f"the database URL {url.split('@')[-1]!r} needs a driver: "
                           "pip install 'fedmq[postgres]'") from None
    migrate(db)
    return db

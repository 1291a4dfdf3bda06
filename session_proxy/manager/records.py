"""The session manager's records: one row per session, and its history.

SQLAlchemy, so a center starts with one SQLite file and moves to
PostgreSQL when several hubs or processes share the records (as JupyterHub
itself does): only the URL changes. The schema is Alembic's
(session_proxy/manager/schema.py): the store upgrades the database at start.

A round of checks reads every live record at once, and the newest record
of every listed server at once: queries per round, not per session (a
center has a thousand).

The records hold every user's options and where each server runs: an
SQLite file is created readable by its owner alone (0600) before SQLAlchemy
opens it, and an existing one that is looser is tightened (SQLite gives its
-journal, -wal and -shm files the database file's mode).
"""
from __future__ import annotations

import datetime
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from dataclasses import dataclass

from sqlalchemy import (JSON, DateTime, ForeignKey, Integer, String, create_engine, func,
                        select, text)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, contains_eager,
                            mapped_column, object_session, relationship, selectinload,
                            sessionmaker)


log = logging.getLogger(__name__)
PRIVATE = 0o600
SQLITE_COMPANIONS = ("", "-journal", "-wal", "-shm")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class Base(DeclarativeBase):
    pass


class SessionRecord(Base):
    """One user's server (``user``/``server_name``) as the manager knows it."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    server_name: Mapped[str] = mapped_column(String(255), default="")
    # running: answering · lost: gone, its recovery about to start ·
    # recovering: being started again · stopped: by request, or left stopped
    state: Mapped[str] = mapped_column(String(32), default="running")
    image: Mapped[str] = mapped_column(String(255), default="")
    mode: Mapped[str] = mapped_column(String(32), default="")
    user_options: Mapped[dict] = mapped_column(JSON, default=dict)
    url: Mapped[str] = mapped_column(String(1024), default="")      # its stable path
    target: Mapped[str] = mapped_column(String(1024), default="")   # where it runs now
    # The hub's start time of the server now serving it: a server started
    # by someone else than the manager is a new session.
    instance: Mapped[str] = mapped_column(String(64), default="")
    # No longer filled in: the checks of users' servers carry no
    # credential, so can't list kernels. Kept for older records.
    kernels: Mapped[list] = mapped_column(JSON, default=list)
    recoveries: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=now,
                                                       onupdate=now)
    events: Mapped[list[EventRecord]] = relationship(
        back_populates="session", order_by="EventRecord.id", cascade="all, delete-orphan")

    def to_dict(self, history: bool = True) -> dict:
        model = {"user": self.user, "server_name": self.server_name, "state": self.state,
                 "image": self.image, "mode": self.mode, "user_options": self.user_options,
                 "url": self.url, "target": self.target, "kernels": self.kernels,
                 "recoveries": self.recoveries, "created": self.created.isoformat(),
                 "updated": self.updated.isoformat()}
        if history:
            model["history"] = [e.to_dict() for e in self.events]
        return model


class EventRecord(Base):
    """Something that happened to a session: started, moved, lost,
    recovering, recovered, recovery-failed, stopped."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Indexed (revision 0002): a page of sessions joins its histories by it.
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id"), index=True)
    time: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=now)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(2048), default="")
    session: Mapped[SessionRecord] = relationship(back_populates="events")

    def to_dict(self) -> dict:
        return {"time": self.time.isoformat(), "kind": self.kind, "detail": self.detail}


@dataclass
class Page:
    """One page of the sessions: ``total`` of them match the filters."""
    sessions: list[dict]
    total: int
    offset: int
    limit: int

    @property
    def next_offset(self) -> int | None:
        end = self.offset + len(self.sessions)
        return end if end < self.total else None


class StoreError(Exception):
    """The records can't be opened (a one-line reason)."""


class SessionStore:
    """The records behind a database URL (``sqlite:///path`` by default,
    or ``postgresql+psycopg://user@host/db`` with the ``postgres`` extra),
    upgraded to the code's schema when opened."""

    def __init__(self, url: str):
        # Imported here: env.py imports this module's Base.
        from session_proxy.manager.schema import SchemaError, upgrade_to_head
        try:
            private_sqlite_file(url)
            # A database server restarted under a running manager: its
            # pooled connections are tested before use (an SQLite file's
            # never go stale).
            self.engine = create_engine(url, pool_pre_ping=make_url(url)
                                        .get_backend_name() != "sqlite")
        except ArgumentError as err:
            raise StoreError(f"session records at {_safe(url)}: {err}") from None
        except ImportError as err:
            raise StoreError(f"session records at {_safe(url)}: no driver ({err}): for "
                             f"PostgreSQL, postgresql+psycopg://... with chspawner's "
                             f"postgres extra installed") from None
        try:
            upgrade_to_head(self.engine)
        except SchemaError as err:
            self.engine.dispose()
            raise StoreError(f"session records at {_safe(url)}: {err}") from None
        except SQLAlchemyError as err:
            self.engine.dispose()
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise StoreError(f"session records at {_safe(url)}: {reason}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as db:
            yield db

    @staticmethod
    def find(db: Session, user: str, server_name: str) -> SessionRecord | None:
        """The newest record of this server (earlier ones were stopped)."""
        return db.scalars(select(SessionRecord)
                          .where(SessionRecord.user == user,
                                 SessionRecord.server_name == server_name)
                          .order_by(SessionRecord.id.desc())).first()

    @staticmethod
    def newest(db: Session, keys: set[tuple[str, str]]) -> dict[tuple[str, str],
                                                                 SessionRecord]:
        """``find`` for many servers in one query: the newest record of
        each of ``keys`` that has one."""
        if not keys:
            return {}
        users = {user for user, _ in keys}
        latest = (select(func.max(SessionRecord.id))
                  .where(SessionRecord.user.in_(users))
                  .group_by(SessionRecord.user, SessionRecord.server_name))
        records = db.scalars(select(SessionRecord).where(SessionRecord.id.in_(latest)))
        return {key: r for r in records if (key := (r.user, r.server_name)) in keys}

    @staticmethod
    def live(db: Session, users: set[str] | None = None) -> list[SessionRecord]:
        """The sessions not stopped: all, or those of ``users``."""
        query = select(SessionRecord).where(SessionRecord.state != "stopped")
        if users is not None:
            query = query.where(SessionRecord.user.in_(users))
        return list(db.scalars(query.order_by(SessionRecord.id)))

    @staticmethod
    def add_event(record: SessionRecord, kind: str, detail: str = "") -> None:
        """Add to the history without loading it (a query per session)."""
        event = EventRecord(kind=kind, detail=detail[:2048])
        if "events" in record.__dict__:  # loaded, or a new record's
            record.events.append(event)
            return
        event.session = record
        db = object_session(record)
        if db is not None:
            db.add(event)

    def all(self, user: str | None = None) -> list[dict]:
        with self.transaction() as db:
            # Every history in one more query, not one per session.
            query = (select(SessionRecord).options(selectinload(SessionRecord.events))
                     .order_by(SessionRecord.id))
            if user is not None:
                query = query.where(SessionRecord.user == user)
            return [r.to_dict() for r in db.scalars(query)]

    def page(self, offset: int = 0, limit: int = 100, user: str | None = None,
             state: str | None = None, since: datetime.datetime | None = None,
             history: bool = True) -> Page:
        """The sessions matching the filters (oldest first), ``limit`` of
        them from ``offset``, in one query: the page is selected by the
        database (WHERE, ORDER BY, LIMIT, OFFSET), the total counted beside
        it (a window function over the matches, before the LIMIT), and the
        page's histories joined to it, however many sessions there are. A
        page past the end costs one more query, for the total. ``since``:
        sessions created or changed (state, target) at or after it."""
        where = []
        if user is not None:
            where.append(SessionRecord.user == user)
        if state is not None:
            where.append(SessionRecord.state == state)
        if since is not None:
            where.append(SessionRecord.updated >= since)
        with self.transaction() as db:
            # The page's ids and the total (only the ids go through the
            # window: the rows themselves are read for the page alone).
            matches = (select(SessionRecord.id, func.count().over().label("total"))
                       .where(*where).order_by(SessionRecord.id)
                       .limit(limit).offset(offset).subquery())
            query = (select(SessionRecord, matches.c.total)
                     .join(matches, SessionRecord.id == matches.c.id)
                     .order_by(SessionRecord.id))
            if history:
                query = (query.outerjoin(SessionRecord.events)
                         .options(contains_eager(SessionRecord.events))
                         .order_by(EventRecord.id))
            rows = db.execute(query).unique().all()
            if rows:
                total = rows[0].total
            else:
                total = db.scalar(select(func.count(SessionRecord.id)).where(*where))
            sessions = [r.to_dict(history=history) for r, _ in rows]
        return Page(sessions, total, offset, limit)

    def count_states(self) -> dict[str, int]:
        """{state: sessions in it}, in one query."""
        with self.transaction() as db:
            return dict(db.execute(select(SessionRecord.state, func.count())
                                   .group_by(SessionRecord.state)).all())

    def ping(self) -> bool:
        """Whether the database answers."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False


def _safe(url: str) -> str:
    """The URL for messages, its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def sqlite_path(url: str) -> str | None:
    """The file behind an SQLite URL; None for another database, an
    in-memory one, or a ``file:`` URI (whose mode SQLite itself sets)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return database


def private_sqlite_file(url: str) -> None:
    """Create the SQLite file 0600 (it may exist already), and tighten it
    and its companions where they are looser; refuse one that is not a
    regular file of this process's user (a link, someone else's file)."""
    path = sqlite_path(url)
    if path is None:
        return
    for suffix in SQLITE_COMPANIONS:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            # The database itself is created here, 0600 whatever the umask
            # lets through; a companion only tightened, left from a looser run.
            fd = (os.open(path, flags | os.O_CREAT, PRIVATE) if not suffix
                  else os.open(path + suffix, flags))
        except FileNotFoundError:
            continue
        try:
            _make_private(fd, path + suffix)
        finally:
            os.close(fd)


def _make_private(fd: int, path: str) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"{path}: the session records must be a regular file "
                              f"owned by uid {os.geteuid()}")
    if info.st_mode & 0o077:
        log.warning("%s was open to others (mode %o): now 0600", path,
                    stat.S_IMODE(info.st_mode))
        os.fchmod(fd, PRIVATE)

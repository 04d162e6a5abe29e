"""One worker's part in a cache several workers share: its files under `cache_dir/workers/`.

    workers/users.lock       every worker holds it shared; the first to open the cache takes it
                             exclusively while it cleans up and rebuilds the ledger
    workers/owners/<t>.lock  each worker's own lock, held for its life: its reservations in the
                             ledger (owner `t`) are a dead worker's once the lock is free
    workers/fills/<k>.lock   the fill lock of each key being filled (`relay.cache.workers.lead`)
    workers/ledger.sqlite    the ledger (`relay.cache.workers.ledger`), with its -wal and -shm

Opening (`open`, blocking): the volume is checked (`relay.cache.workers.volume`), then the
users lock is taken. The process that gets it exclusively is alone on the cache (the server's
first start, or every worker restarted): it is `first`, and removes what earlier runs left
(partial files, fill locks, incomplete objects: `Store.load`), rebuilds the ledger from the
files, then holds the lock shared like every other (`joined`). A process that finds others
there waits for the first one's rebuild, then loads the index from the ledger, touching no
file another worker may be writing: restarting one worker loses nothing and disturbs no fill.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from relay.cache.store import Meta, Store
from relay.cache.workers import volume
from relay.cache.workers.index import LedgerIndex
from relay.cache.workers.lead import Locks
from relay.cache.workers.ledger import Ledger, LedgerError
from relay.disk import remove_quietly

_OWNER = re.compile(r"[0-9a-f]{16}")
#: Seconds a measure of the directories and shared files is used for.
MEASURE_EVERY = 1.0
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class Shared:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.directory = root / "workers"
        self.locks = Locks(self.directory / "fills")
        self.owner = secrets.token_hex(8)
        self.first = False
        """This process opened the cache alone: it cleans up and rebuilds the ledger."""
        self._owners = self.directory / "owners"
        self._users: int | None = None
        self._mine: int | None = None
        self._ledger: Ledger | None = None
        self._measured: tuple[float, int] | None = None

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "open the shared cache first"
        return self._ledger

    def open(self, *, check_volume: bool = True) -> None:
        """Check the volume, take the users lock (waiting for a first opener's rebuild), this
        worker's own lock, and open the ledger (blocking). `volume.UnfitVolume` when the
        volume cannot be trusted with the locks."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if check_volume:
            volume.check(self.directory)
        try:
            self._users = os.open(self.directory / "users.lock", _FLAGS, 0o600)
            try:
                fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.first = True
            except BlockingIOError:
                fcntl.flock(self._users, fcntl.LOCK_SH)  # after the first opener's rebuild
            self._owners.mkdir(exist_ok=True)
            self._mine = os.open(self._owners / f"{self.owner}.lock", _FLAGS, 0o600)
            fcntl.flock(self._mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.locks.prepare()
            self._ledger = self._open_ledger()
            if self.first:
                self.locks.clear()
            self._forget_dead_owners()
        except BaseException:
            self.close()
            raise

    def _open_ledger(self) -> Ledger:
        """The ledger; the first opener starts a damaged one afresh (it rebuilds it from the
        files anyway), another worker refuses to start (`LedgerError`)."""
        path = self.directory / "ledger.sqlite"
        try:
            return Ledger(path, self.owner)
        except LedgerError:
            if not self.first:
                raise
        for name in ("", "-wal", "-shm"):
            remove_quietly(path.with_name(path.name + name))
        return Ledger(path, self.owner)

    def load(self, store: Store) -> tuple[list[tuple[Path, Meta, int]], int]:
        """A worker joining others: the stored versions the ledger records, their records
        read (nothing on disk is cleaned up: a fill of another worker may be writing), and
        the last ledger change they include (blocking). The write counter is read first: a
        change committed after the rows were read moves it again, and the index applies it
        at its first lookup."""
        loaded: list[tuple[Path, Meta, int]] = []
        self.ledger.changed()
        rows, seq = self.ledger.rows()
        for row in rows:
            data = store.objects / row.data
            meta = store.read_published(data.with_suffix(".partial"))
            if meta is not None and meta.key == row.key:
                loaded.append((data, meta, row.cost))
        return loaded, seq

    def index(self, max_bytes: int, store: Store, monotonic: Callable[[], float]) -> LedgerIndex:
        """This worker's index, kept in step with the ledger."""
        return LedgerIndex(
            max_bytes,
            lambda: self.overhead(store.objects, monotonic()),
            self.ledger,
            store,
            monotonic,
            lambda: self.overhead(store.objects),
        )

    def loaded(self, index: LedgerIndex, seq: int) -> None:
        """`index` holds what was loaded (`seq`: a joining worker's last change loaded). The
        first opener rebuilds the ledger from it, alone on the cache until `joined` (no
        change can come in between), then lets the others in."""
        index.seq = seq
        if not self.first:
            return
        self.ledger.rebuild(index.row_of(entry) for entry in index.entries())
        index.seq = self.ledger.last_change()
        self.ledger.changed()
        self.joined()

    def joined(self) -> None:
        """The first opener's cleanup is done: others may open the cache (the exclusive lock
        becomes a shared one)."""
        if self._users is not None and self.first:
            fcntl.flock(self._users, fcntl.LOCK_SH)

    def close(self) -> None:
        """Leave the cache: this worker's reservations and own lock go (blocking)."""
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            with contextlib.suppress(Exception):
                ledger.forget_owners([self.owner])
            ledger.close()
        mine, self._mine = self._mine, None
        if mine is not None:
            remove_quietly(self._owners / f"{self.owner}.lock")
            os.close(mine)
        users, self._users = self._users, None
        if users is not None:
            os.close(users)

    def _forget_dead_owners(self) -> None:
        """Reservations and lock files of workers that are gone."""
        dead = [o for o in self.ledger.owners() if o != self.owner and not self._alive(o)]
        if dead:
            self.ledger.forget_owners(dead)
        for path in self._owners.iterdir():
            name = path.name.removesuffix(".lock")
            if name != self.owner and (not _OWNER.fullmatch(name) or not self._alive(name)):
                remove_quietly(path)

    def _alive(self, owner: str) -> bool:
        try:
            fd = os.open(self._owners / f"{owner}.lock", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def overhead(self, objects: Path, now: float | None = None) -> int:
        """What the cache's directories and the workers' shared files take on disk (every
        worker sees the same): cache_dir, objects/ and its buckets, workers/ and its files.
        Measured at most every `MEASURE_EVERY` seconds (`now`: the monotonic clock) for the
        budget: a few hundred `stat`s on the loop, and directories change size only every
        hundred-odd entries; measured now without `now` (a scrape: every worker reports the
        same)."""
        if now is None:
            return self._measure(objects)
        if self._measured is not None and now - self._measured[0] < MEASURE_EVERY:
            return self._measured[1]
        total = self._measure(objects)
        self._measured = (now, total)
        return total

    def _measure(self, objects: Path) -> int:
        total = 0
        for directory in (self.root, objects, self.directory):
            total += _blocks(directory)
        for parent in (objects, self.directory, self._owners, self.locks.directory):
            with contextlib.suppress(OSError), os.scandir(parent) as it:
                for item in it:
                    if parent is objects and not item.is_dir(follow_symlinks=False):
                        continue
                    with contextlib.suppress(OSError):
                        total += item.stat(follow_symlinks=False).st_blocks * 512
        return total


def _blocks(path: Path) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


__all__ = ["Shared"]

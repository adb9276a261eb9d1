"""What the export overlaps with the reconstruction: its file writes (:class:`ParticleWriter`, on their own thread
while the next batch is reconstructed) and the next tilt series' engine (:class:`Prefetch`, built on a background
thread and :func:`background_pool` while the current tilt series reconstructs).

A :class:`ParticleWriter` runs the write tasks of one tilt series (check a particle's volumes, write its MRC
files, log progress) on one thread, in the order they were submitted, through a queue of at most ``max_pending``
tasks: :meth:`ParticleWriter.submit` blocks while the queue is full, so the particles waiting to be written never
exceed one batch, however many particles the tilt series has. mrcfile's writes and NumPy's reductions release the
GIL, so the writes run while the engine computes.

Failures keep the serial export's guarantees. The first task that raises (a bad volume's
:class:`~mspecies.core.reconstruct.ReconstructionError`, an :class:`OSError` of a write) stops the writer: the tasks
after it are not run, and the error, the same exception object, is raised on the submitting thread by the next
:meth:`~ParticleWriter.submit` or by :meth:`~ParticleWriter.close`, so the export stops with the message it gives
today. When the submitting thread fails instead (an engine error, Ctrl-C), leaving the ``with`` block discards the
queued tasks and waits for the task in progress, so no file is written after the caller's cleanup (the staging
folder's removal) has begun.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

from mspecies.core.insert import WorkerPool

Task = Callable[[], None]
T = TypeVar("T")


class ParticleWriter:
    """Run write tasks in order on one thread (``max_pending`` ≥ 1 queued at most), or inline (``max_pending`` 0).

    Use as a context manager: a normal exit waits for every task and raises the first task error; an exit by an
    exception discards what is queued, waits for the running task and lets the exception through.
    """

    def __init__(self, max_pending: int, *, name: str = "mspecies-writer") -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending: expected an integer >= 0, got {max_pending}")
        self.max_pending = max_pending
        self._queue: queue.Queue[Task | None] = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = None
        if max_pending:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def submit(self, task: Task) -> None:
        """Queue ``task`` (waiting while ``max_pending`` tasks are queued), or run it now without a thread; raise
        the error of an earlier task, if one failed."""
        self._raise_error()
        if self._thread is None:
            task()
        else:
            self._queue.put(task)

    def wait(self) -> None:
        """Wait until every queued task has run (the writer stays open); raise the first task error."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Wait until every queued task has run and stop the thread; raise the first task error."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_error()

    def abort(self) -> None:
        """Discard the queued tasks and wait for the running one (its error, if any, is dropped)."""
        self._stopped.set()
        if self._thread is not None:
            self._queue.put(None)  # the writer skips the discarded tasks quickly, so this finds room
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ParticleWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                if self._error is None and not self._stopped.is_set():  # after a failure or an abort: drain
                    task()
            except BaseException as error:  # noqa: BLE001 (raised again on the submitting thread)
                self._error = error
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


class Prefetch(Generic[T]):
    """``work()`` started at once on a daemon thread; :meth:`result` waits for it and returns its value or raises
    its error on the calling thread.

    The export builds the next tilt series' engine with it (reads and filters its stack, builds its tables; writes
    no file). When the export fails before asking for the result, the thread is left to finish on its own: nothing
    on disk depends on it, and a stopped run (Ctrl-C) does not wait for it.
    """

    def __init__(self, work: Callable[[], T], *, name: str = "mspecies-prepare") -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(work,), name=name, daemon=True).start()

    def _run(self, work: Callable[[], T]) -> None:
        try:
            self._value = work()
        except BaseException as error:  # noqa: BLE001 (raised again by result())
            self._error = error
        finally:
            self._done.set()

    def result(self) -> T:
        """The value of ``work()`` once it has finished; its exception if it raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


_BACKGROUND_POOLS: dict[tuple[int, int], WorkerPool] = {}


def background_pool(threads: int) -> WorkerPool | None:
    """A process-wide pool of ``threads`` threads for work done ahead (the next tilt series' stack), apart from
    the engine's pool (:func:`~mspecies.core.insert.thread_pool`): the engine's batch steps never queue behind
    it, and once the current tilt series is done it still has every core. None for 1 thread."""
    if threads <= 1:
        return None
    key = (os.getpid(), threads)
    if key not in _BACKGROUND_POOLS:
        _BACKGROUND_POOLS[key] = WorkerPool(threads)
    return _BACKGROUND_POOLS[key]

"""What the export overlaps with the reconstruction: its file writes (:class:`ParticleWriter`, on their own thread
while the next batch is reconstructed) and the next tilt series' engine (:class:`Prefetch`, built on a background
thread and :func:`background_pool` while the current tilt series reconstructs).

A :class:`ParticleWriter` runs the write tasks of one tilt series (check a particle's volumes, write its MRC
files, log progress) on one thread, in the order they were submitted, through a queue of at most ``max_pending``
tasks: :meth:`ParticleWriter.submit` blocks while the queue is full, so the particles waiting to be written never
exceed one batch, however many particles the tilt series has. mrcfile's writes and NumPy's reductions release the
GIL, so the writes run while the engine computes. When the reconstruction is over, :meth:`ParticleWriter.close`
writes what is left (the last batch) on two threads, the submitting one beside the writer's, instead of leaving a
core idle; a task submitted with ``after_earlier=True`` (a progress line) still starts only once every task before
it has finished.

Failures keep the serial export's guarantees. The first task that raises (a bad volume's
:class:`~mspecies.core.reconstruct.ReconstructionError`, an :class:`OSError` of a write) stops the writer: the tasks
after it are not started, and the error, the same exception object, is raised on the submitting thread by the next
:meth:`~ParticleWriter.submit` or by :meth:`~ParticleWriter.close`, so the export stops with the message it gives
today (when two tasks fail while :meth:`~ParticleWriter.close` runs two threads, the error of the task submitted
first). When the submitting thread fails instead (an engine error, Ctrl-C), leaving the ``with`` block discards the
queued tasks and waits for the task in progress, so no file is written after the caller's cleanup (the staging
folder's removal) has begun.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, NamedTuple, TypeVar

from mspecies.core.insert import WorkerPool

Task = Callable[[], None]
T = TypeVar("T")


class ParticleWriter:
    """Run write tasks in order on one thread (``max_pending`` ≥ 1 queued at most), or inline (``max_pending`` 0).

    Use as a context manager: a normal exit waits for every task (the submitting thread helping with the last
    ones) and raises the first task error; an exit by an exception discards what is queued, waits for the running
    task and lets the exception through.
    """

    def __init__(self, max_pending: int, *, name: str = "mspecies-writer") -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending: expected an integer >= 0, got {max_pending}")
        self.max_pending = max_pending
        self._queue: queue.Queue[_Queued | None] = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._failed_at: int | None = None  # submission number of the task whose error is kept
        self._finished: set[int] = set()  # submission numbers of finished tasks after the first unfinished one
        self._first_unfinished = 0
        self._state = threading.Condition()
        self._submitted = 0
        self._stopped = threading.Event()
        self._ended = threading.Event()  # the writer's thread has left its loop
        self._thread = None
        if max_pending:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def submit(self, task: Task, *, after_earlier: bool = False) -> None:
        """Queue ``task`` (waiting while ``max_pending`` tasks are queued), or run it now without a thread; raise
        the error of an earlier task, if one failed. ``after_earlier``: the task starts only once every task
        submitted before it has finished (a progress line that counts their files)."""
        self._raise_error()
        if self._thread is None:
            task()
        else:
            self._queue.put(_Queued(self._submitted, task, after_earlier))
            self._submitted += 1

    def wait(self) -> None:
        """Wait until every queued task has run (the writer stays open); raise the first task error."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Run the queued tasks on this thread beside the writer's until none is left, stop the writer; raise the
        first task error."""
        if self._thread is not None:
            try:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._run_one(item)
                self._end_thread()
            except BaseException:  # stopped here (Ctrl-C): no file is written after the caller's cleanup
                self.abort()
                raise
        self._raise_error()

    def abort(self) -> None:
        """Discard the queued tasks and wait for the running one (its error, if any, is dropped)."""
        self._stopped.set()
        with self._state:
            self._state.notify_all()  # a progress line waiting for earlier tasks is discarded too
        if self._thread is not None:
            self._end_thread()  # the writer skips the discarded tasks quickly

    def __enter__(self) -> ParticleWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _end_thread(self) -> None:
        """Stop the writer's thread once it has finished the task it runs, and wait until it has left its loop.
        ``Thread.join`` alone is not enough: interrupted by a signal handler's exception (Ctrl-C), CPython 3.11
        marks the thread stopped although it still runs, and a second ``join`` then returns at once."""
        self._queue.put(None)
        self._ended.wait()
        self._thread.join()  # type: ignore[union-attr]
        self._thread = None

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                self._run_one(item)
            self._queue.task_done()
        finally:
            self._ended.set()

    def _run_one(self, item: _Queued) -> None:
        """Run one queued task unless the writer was stopped or an earlier task failed; keep its error if it
        fails (the earliest submitted one's when two threads fail)."""
        try:
            with self._state:
                if item.after_earlier:
                    self._state.wait_for(lambda: self._first_unfinished >= item.number or self._stopped.is_set())
                run = not self._stopped.is_set() and (self._failed_at is None or item.number < self._failed_at)
            if run:
                try:
                    item.task()
                except BaseException as error:  # noqa: BLE001 (raised again on the submitting thread)
                    with self._state:
                        if self._failed_at is None or item.number < self._failed_at:
                            self._failed_at, self._error = item.number, error
        finally:
            with self._state:
                self._finished.add(item.number)
                while self._first_unfinished in self._finished:
                    self._finished.remove(self._first_unfinished)
                    self._first_unfinished += 1
                self._state.notify_all()
            self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


class _Queued(NamedTuple):
    """A task of :class:`ParticleWriter` with its submission number."""

    number: int
    task: Task
    after_earlier: bool


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

"""Engines that run a fit or an apply as tasks over row ranges (see :mod:`normstats.tasks`).

- :func:`run_fit_parallel`: forked processes on this machine (``--jobs N``);
- :func:`run_fit_dask` and :func:`apply_dask`: a Dask cluster, local or
  remote (``--engine dask``; needs the ``dask`` extra).

Both plan the same :class:`~normstats.tasks.FitTask` ranges and combine the
states with the same :func:`~normstats.tasks.join` in a tree, so they give
what the serial fit gives, to float64 rounding.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional, Union

from .errors import EngineError, UsageError
from .normalize import Normalizer
from .pipeline import Progress, check_side, with_provenance
from .stream import Stream, block_rows_for
from .recipe import Recipe
from .stats import Stats
from .writers.atomic import held_signals
from .writers.rows import preallocated_output
from .kernels import load_kernels
from .tasks import ApplyTask, FitTask, Inputs, join, run, split_rows

TASK_BYTES = 256 << 20  # input per Dask task: seconds of work, few enough tasks for the scheduler
DASK_HINT = "pip install 'normstats[dask]'"
CONNECT_TIMEOUT = "10s"  # a refused connection is retried until then
QUIET = logging.CRITICAL + 1  # a log level above every message


def _plan(stream: Stream, side: dict[str, Stream], *, allow_external: bool, absolute: bool,
          batch_size: Optional[int], block_rows: Optional[int], parts: Optional[int] = None,
          rows_per_task: Optional[int] = None) -> tuple[Inputs, int, list[tuple[int, int]]]:
    """What tasks over `stream` need: its inputs, the rows per read block (the
    usual size, but no more than a task's share, rounded to whole batches of
    a moving average) and
    the row ranges, `parts` of them or about `rows_per_task` rows each."""
    check_side(stream, side)
    inputs = Inputs.of(stream, side, allow_external=allow_external, absolute=absolute)
    share = rows_per_task or -(-stream.rows // parts)
    block_rows = min(block_rows or block_rows_for(stream.row_bytes, None), share)
    if batch_size and batch_size > block_rows:  # batches span blocks; ranges are whole batches
        return inputs, block_rows, split_rows(stream.rows, batch_size, parts=parts, rows_per_task=rows_per_task)
    block_rows = block_rows_for(stream.row_bytes, batch_size, rows=block_rows)
    return inputs, block_rows, split_rows(stream.rows, block_rows, parts=parts, rows_per_task=rows_per_task)


def _dask_task_rows(stream: Stream, task_rows: Optional[int]) -> int:
    return task_rows or max(1, TASK_BYTES // stream.row_bytes)


def _fit_tasks(recipe: Union[Recipe, dict], stream: Stream, side: dict[str, Stream], *, copies: int = 1,
               max_memory: Optional[int] = None, read_ahead: bool, **plan: Any) -> list[FitTask]:
    """The tasks of a split fit; refused if it continues a stats file (every range
    would count it again) or if `copies` of its state do not fit in memory. Tasks
    that fill the cores read inline (no `read_ahead` thread: a block reduced in
    the thread that read it is still in the cache; on 2 cores 6.7-6.9 GB/s, not 5.0-5.7)."""
    recipe = Recipe.of(recipe)
    later = recipe.later()
    recipe.check_memory(stream.row_shape, copies=copies, row_bytes=stream.row_bytes, max_memory=max_memory)
    inputs, block_rows, ranges = _plan(stream, side, batch_size=recipe.row_unit, **plan)
    open_batches = recipe.spans(block_rows)
    return [FitTask(recipe if a == 0 else later, inputs, a, b, block_rows, open_batches, read_ahead)
            for a, b in ranges]


def _tree(items: list, combine: Callable[[Any, Any], Any]) -> Any:
    """Combine consecutive items pairwise, level by level, keeping their order."""
    while len(items) > 1:
        items = [combine(*items[i:i + 2]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def run_fit_parallel(
    recipe: Union[Recipe, dict],
    stream: Stream,
    *,
    side: Optional[dict[str, Stream]] = None,
    allow_external: bool = False,
    jobs: int = 2,
    block_rows: Optional[int] = None,
    max_memory: Optional[int] = None,
) -> Stats:
    """A fit split over `jobs` processes by row range, their states combined.

    Each process opens the shards of its rows itself (HDF5 handles do not
    pickle) and feeds the same state object code. Exact states merge (Chan);
    moving averages are linear in their batches, so each later range starts
    from zero and is appended with ``follow``. Either way the result equals a
    serial fit to float64 rounding; the ranges are whole read blocks (whole
    batches), so the counters match too.

    Parameters
    ----------
    recipe : Recipe or dict
        What each process builds its state from (a dict
        ``{"kind", "mode", "options"}`` is taken as :meth:`Recipe.of` does).
        A recipe that continues a stats file (``init``) is refused.
    stream : Stream
        The feature shards (opened here only to plan; each process reopens its share).
    side : dict of str to Stream, optional
        Per-row inputs by name ('labels', 'weights', 'groups').
    allow_external : bool
        As the streams were opened (see :func:`normstats.readers.api.open_source`).
    jobs : int
        Processes (the rows are split evenly).
    block_rows : int, optional
        Rows per read block (default about 8 MB), rounded to whole batches.
    max_memory : int, optional
        Bytes the states of all processes may take together (default: the
        memory available); checked before any work.
    """
    side = side or {}
    tasks = _fit_tasks(recipe, stream, side, allow_external=allow_external, absolute=False,
                       block_rows=block_rows, parts=jobs, copies=jobs + 1, max_memory=max_memory,
                       read_ahead=jobs < (os.cpu_count() or 1))
    started = time.perf_counter()
    # Load the compiled kernels before forking: the workers then share their pages (each
    # loading numba itself cost some 100 MB of memory per process).
    load_kernels(stream.dtype)
    state = _tree(run_in_processes(tasks, describe=lambda task: _rows_of(task, stream)), join)
    stats = with_provenance(state.result(), stream, side, time.perf_counter() - started, stream.rows)
    stats.meta["jobs"] = len(tasks)
    return stats


def _rows_of(task: FitTask, stream: Stream) -> str:
    return f"rows {task.start:,}-{task.stop - 1:,} of {', '.join(stream.names)}"


STOP_SECONDS = 1.0  # how long a terminated worker has before it is killed


def run_in_processes(tasks: list, *, describe: Callable[[Any], str] = repr) -> list:
    """Run each task in a process of its own (forked where possible); their results in order.

    A task's error is raised here. A worker that dies without a result (killed,
    out of memory) is an :class:`EngineError` naming it and `describe(task)`.
    On any exit without results (Ctrl-C, SIGTERM, a failed task) the other
    workers are terminated, then killed after STOP_SECONDS: none outlives the call.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    workers, results = [], {}
    try:
        # Signals are held while forking, so a worker never starts with the parent's handlers
        # live: it ignores Ctrl-C (the parent stops it) and dies on SIGTERM.
        with held_signals():
            for index, task in enumerate(tasks):
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(task, sender, os.getpid()), daemon=True)
                process.start()
                sender.close()
                workers.append((index, process, receiver))
        waiting = {receiver: (index, process) for index, process, receiver in workers}
        while waiting:
            for receiver in multiprocessing.connection.wait(list(waiting)):
                index, process = waiting.pop(receiver)
                try:
                    ok, value = receiver.recv()
                except (EOFError, OSError):
                    process.join(STOP_SECONDS)
                    raise EngineError(_died(index, len(tasks), process, describe(tasks[index]))) from None
                if not ok:
                    raise value
                results[index] = value
        return [results[index] for index in range(len(tasks))]
    finally:
        # Workers that sent their result are exiting; the others are stopped.
        _stop([process for _, process, _ in workers], patient=len(results) == len(tasks))
        for _, _, receiver in workers:
            receiver.close()


def _worker(task: Any, sender: Any, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        message = (True, run(task))
    except BaseException as error:  # sent back whole: a NormstatsError keeps its file and row
        message = (False, error)
    try:
        sender.send(message)
    except Exception as error:  # a result or error that does not pickle
        sender.send((False, EngineError(f"a --jobs worker could not send its result back: {error}")))
    sender.close()


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies, even by SIGKILL (no strays)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request
        os._exit(1)


def _stop(processes: list, *, patient: bool) -> None:
    processes = [p for p in processes if p.is_alive()]
    for process in processes if not patient else ():
        process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _died(index: int, count: int, process: Any, what: str) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
        if -code == signal.SIGKILL:
            how += " (perhaps out of memory: see the system log)"
    else:
        how = f"exited with code {code} without a result"
    return (f"--jobs worker {index + 1} of {count} (pid {process.pid}, {what}) {how}; "
            "run again, with fewer --jobs if memory is short")


# --- Dask ------------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(scheduler: Optional[str] = None, *, workers: Optional[int] = None) -> Iterator[Any]:
    """A ``distributed.Client`` of the scheduler at `scheduler`, or of a local cluster.

    The local cluster has `workers` single-threaded worker processes (default:
    one per core), listens on the loopback address only, and is shut down on
    exit.

    Raises
    ------
    UsageError
        dask.distributed is not installed, or the scheduler cannot be reached.
    """
    try:
        import distributed
        from distributed.utils import silence_logging_cmgr
    except ImportError:
        raise UsageError(f"--engine dask needs dask.distributed; install it with {DASK_HINT}") from None
    # The cluster's logs (a failed task's traceback, a restarted worker) stay out of the
    # terminal: what matters reaches the user as the one error of the run.
    with silence_logging_cmgr(QUIET):
        if scheduler:
            try:
                client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError, ValueError) as error:
                raise UsageError(f"cannot connect to the Dask scheduler at {scheduler}: {error}") from None
            with client:
                yield client
            return
        with distributed.LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                      processes=True, host="127.0.0.1", dashboard_address=":0",
                                      silence_logs=QUIET) as cluster, distributed.Client(cluster) as client:
            yield client


def _gather(client: Any, tasks: list, progress: Progress, combine: Optional[Callable] = None) -> list:
    """Run `tasks` on the cluster; with `combine`, reduce their results in a tree there.

    Progress advances by each task's rows as it finishes. A worker lost
    mid-run has its tasks (and any results it held) recomputed by Dask.
    """
    import distributed

    futures = client.map(run, tasks, pure=False)
    rows = {future.key: task.stop - task.start for future, task in zip(futures, tasks)}
    final = [_tree(futures, lambda a, b: client.submit(combine, a, b, pure=False))] if combine else futures
    try:
        for future in distributed.as_completed(futures):
            future.result()  # raises the task's error (a NormstatsError keeps its file and row)
            if progress:
                progress(rows[future.key])
        return client.gather(final)
    except Exception as error:
        # No explicit cancel (cancelling a tree's leaves trips an assertion in the
        # scheduler): the futures are released when they go out of scope, and
        # the scheduler then drops the tasks not yet run.
        if isinstance(error, concurrent.futures.CancelledError):
            raise EngineError(f"the Dask cluster cancelled the work: {error}") from None
        if isinstance(error, distributed.KilledWorker):
            raise EngineError(f"Dask workers died repeatedly running one task ({error}); "
                              "check the workers' memory and logs") from None
        raise


def run_fit_dask(
    recipe: Union[Recipe, dict],
    stream: Stream,
    client: Any,
    *,
    side: Optional[dict[str, Stream]] = None,
    allow_external: bool = False,
    task_rows: Optional[int] = None,
    block_rows: Optional[int] = None,
    progress: Progress = None,
    max_memory: Optional[int] = None,
) -> Stats:
    """A fit run as Dask tasks over row ranges, their states joined in a tree on the cluster.

    Every worker must be able to read the inputs at their absolute paths
    (shared storage) and import normstats. Parameters as for
    :func:`run_fit_parallel`, and:

    Parameters
    ----------
    client : distributed.Client
        See :func:`dask_client`.
    task_rows : int, optional
        Rows per task (default: about 256 MB of input), rounded to read blocks.
    progress : callable, optional
        Called with the rows of each finished task.
    max_memory : int, optional
        Bytes one state may take (default: the memory available here).
    """
    side = side or {}
    tasks = _fit_tasks(recipe, stream, side, allow_external=allow_external, absolute=True,
                       block_rows=block_rows, rows_per_task=_dask_task_rows(stream, task_rows),
                       max_memory=max_memory, read_ahead=False)  # (a task per worker thread, a thread per core)
    started = time.perf_counter()
    state, = _gather(client, tasks, progress, combine=join)
    stats = with_provenance(state.result(), stream, side, time.perf_counter() - started, stream.rows)
    stats.meta.update(engine="dask", tasks=len(tasks), workers=len(client.scheduler_info()["workers"]))
    return stats


def apply_dask(
    normalizer: Normalizer,
    stream: Stream,
    output: str,
    client: Any,
    *,
    groups: Optional[Stream] = None,
    allow_external: bool = False,
    task_rows: Optional[int] = None,
    progress: Progress = None,
) -> dict:
    """:func:`normstats.pipeline.apply_stats` as Dask tasks over row ranges.

    The output (`.npy` or HDF5, contiguous) is allocated first; each task
    writes its rows in place, so the file holds what the local engine writes
    and is renamed into place only when every task has finished. `output`
    must be on storage every worker sees at the same path.
    """
    normalizer.check(stream.row_shape, stream.dtype, ", ".join(stream.names))
    side = {} if groups is None else {"groups": groups}
    inputs, block_rows, ranges = _plan(stream, side, allow_external=allow_external, absolute=True,
                                       batch_size=None, block_rows=None,
                                       rows_per_task=_dask_task_rows(stream, task_rows))
    started = time.perf_counter()
    with preallocated_output(output, stream.shape, normalizer.result_dtype(stream.dtype),
                             stream.sources[0].dataset or "data") as region:
        tasks = [ApplyTask(normalizer, inputs, a, b, block_rows, region) for a, b in ranges]
        written = sum(_gather(client, tasks, progress))
        if written != stream.rows:  # never rename a partial file into place
            raise EngineError(f"the tasks wrote {written} of {stream.rows} rows")
    return {"rows": stream.rows, "bytes_read": stream.nbytes, "seconds": time.perf_counter() - started,
            "tasks": len(tasks)}

"""How learning uses the machine: fits side by side in forked processes, each on one thread, and how many
threads a fit gets. The fits themselves are in ``learn``; this module holds no model and no maths."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from typing import Any, Callable, Iterator

import torch

from .bank import Bank
from .errors import LaionfilterError
from .devices import torch_threads, usable_cores

# Below this many parameters per model a forward is so short that threads spend their time waiting for
# each other; beside another busy process they then collapse (benchmarks/threads.py: a 100-step fit on
# the starter bank, 2 cores, beside a busy process: 18.4 s with torch's 2 threads, 5.9 s with one).
SMALL_MODEL_PARAMETERS = 10_000_000


@contextlib.contextmanager
def learning_threads(bank: Bank, threads: int | None = None) -> Iterator[int]:
    """Within the block, torch uses ``threads`` CPU threads if given, else 1 for small models and its
    default (every core) for larger ones; the previous count is restored after."""
    if threads is None:
        threads = 1 if bank.parameters < SMALL_MODEL_PARAMETERS else torch.get_num_threads()
    if threads < 1:
        raise LaionfilterError(f"--threads must be ≥ 1, not {threads}")
    with torch_threads(threads):
        yield threads


def fit_processes(merger, jobs: int | None = None) -> int:
    """How many fits to run at once, each in a forked process on one CPU thread: ``jobs`` if given,
    else ``LAIONFILTER_JOBS`` if set, else, for a small model whose fits run on one thread (see
    ``learning_threads``), one per core, which a fit would otherwise leave idle; else 1 (a larger
    model's fits use the cores through torch's threads, and a fit per core would hold a merged model
    and its activations per core). 1 on a GPU, off Linux and inside a daemonic process (a benchmark's
    worker), which may not start processes of its own."""
    if jobs is None and os.environ.get("LAIONFILTER_JOBS"):
        try:
            jobs = int(os.environ["LAIONFILTER_JOBS"])
        except ValueError:
            raise LaionfilterError(f"LAIONFILTER_JOBS={os.environ['LAIONFILTER_JOBS']!r}: not a whole number") from None
    if jobs is not None and jobs < 1:
        raise LaionfilterError(f"--jobs must be ≥ 1, not {jobs}")
    if merger.device.type != "cpu" or sys.platform != "linux" or mp.current_process().daemon:
        return 1
    if jobs is None:
        small = merger.bank.parameters < SMALL_MODEL_PARAMETERS
        return usable_cores() if small and torch.get_num_threads() == 1 else 1
    if jobs > 1:
        _check_one_thread(jobs)  # here, before any work, as well as where the processes start
    return jobs


def _check_one_thread(processes: int) -> None:
    # a process forked after torch's OpenMP threads ran hangs in its first parallel region
    if torch.get_num_threads() != 1:
        raise LaionfilterError(f"--jobs {processes} runs each fit in its own process on one thread; torch runs "
                               f"{torch.get_num_threads()} per fit here: add --threads 1, or use --jobs 1")


# The jobs of one run_jobs call and its step counter, set before the pool forks its workers, which
# inherit them: the merger's tensors are shared by the fork, never pickled.
_FORKED: tuple[list[Callable[..., Any]], Any] | None = None


def _forked_job(i: int) -> Any:
    jobs, counter = _FORKED

    def on_step(k: int) -> None:
        with counter.get_lock():
            counter.value += k
    return jobs[i](on_step=on_step)


def run_jobs(jobs: list[Callable[..., Any]], processes: int = 1, on_step: Callable[[int], Any] | None = None) -> list[Any]:
    """Each job (a ``fit``, or one of ``evaluate``'s splits, waiting only for its ``on_step``) run, in
    this process or in up to ``processes`` forked ones, with the same results either way (each fit is
    seeded, and runs on one thread); ``on_step`` is told of every step, from whichever process made it."""
    processes = min(processes, len(jobs))
    if processes <= 1:
        return [job(on_step=on_step) for job in jobs]
    _check_one_thread(processes)
    global _FORKED
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    _FORKED = (jobs, counter)
    try:
        # leaving the block terminates the workers: at once on an error or Ctrl-C, instead of letting
        # them go on to the jobs still queued
        with ctx.Pool(processes) as pool:
            results, told, done = [pool.apply_async(_forked_job, (i,)) for i in range(len(jobs))], 0, False
            while not done:
                next(r for r in results if not r.ready()).wait(0.25)
                for r in results:
                    if r.ready() and not r.successful():
                        r.get()  # raises the job's error now, not once the others are done
                done = all(r.ready() for r in results)
                if on_step and counter.value > told:
                    on_step(counter.value - told)
                    told = counter.value
            return [r.get() for r in results]
    finally:
        _FORKED = None

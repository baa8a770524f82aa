"""Memory read bandwidth, probed STREAM-style: the bound a batch-1 decode step is measured against.

A decode step reads every weight once, so bytes per step / the bandwidth the machine can read is
its shortest possible time. The probe must therefore reach what the cores can actually read, or
every "share of bandwidth" above it flatters the step. What it does, per thread count:

- each thread owns its own buffer, allocated and first written by that thread (so on a multi-node
  machine its pages sit on that thread's node);
- every pass starts all threads at a barrier, and lasts from the first start to the last finish;
- in every other pass each thread is pinned to its own CPU of the process's affinity set
  (``os.sched_setaffinity`` on the thread), so the readers surely run on distinct CPUs and are
  never migrated mid-pass; in the passes between, they run where the scheduler puts them, which
  on a machine shared with other work lets a reader leave a CPU another process holds (pinned
  passes read up to 40% less there, measured on the 2-core development machine under load);
- a pass reads each buffer once with ``np.add.reduce`` over int64: integer adds are associative, so
  numpy runs them as plain SIMD adds (no pairwise summation as for floats, no NaN handling as in a
  float max), one add per loaded vector, and the loads are the bottleneck; numpy releases the GIL
  inside, so the threads read in parallel;
- the best of several passes is the figure (a loaded machine only ever makes a pass slower).

Only numpy and the standard library: ``sherry bench`` and ``sherry compare`` can both use it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DEFAULT_BYTES = float(1 << 30)
"""Bytes read per pass, over all threads: far above any cache of the machines we run on."""
DEFAULT_PASSES = 6
"""Passes per probe, pinned and free in turn."""


def read_bandwidth(threads: int, nbytes: float = DEFAULT_BYTES, passes: int = DEFAULT_PASSES) -> float:
    """GB/s (1e9 bytes per second) that ``threads`` threads read together; the best of ``passes`` passes.

    ``nbytes`` is split evenly between the threads. Only the pool's threads are ever pinned, never the
    caller's: threads started later (onnxruntime's) inherit the affinity of the thread that starts them.
    """
    if threads < 1 or passes < 1:
        raise ValueError(f"threads and passes must be at least 1, got {threads} and {passes}")
    words = int(nbytes) // 8 // threads
    if words < 1:
        raise ValueError(f"{nbytes:g} bytes cannot be split between {threads} threads")
    cpus = sorted(os.sched_getaffinity(0))
    pin = threads <= len(cpus)  # more threads than CPUs: never pinned, the scheduler shares the CPUs out
    barrier = threading.Barrier(threads)

    def read(index: int) -> list[tuple[float, float]]:
        try:
            if pin:  # 0: the calling thread
                os.sched_setaffinity(0, {cpus[index]})
            buffer = np.ones(words, np.int64)  # written here: every page mapped, near this CPU
            spans = []
            for p in range(passes):
                if pin:
                    os.sched_setaffinity(0, {cpus[index]} if p % 2 == 0 else cpus)
                barrier.wait()
                start = time.perf_counter()
                np.add.reduce(buffer)
                spans.append((start, time.perf_counter()))
            return spans
        except BaseException:
            barrier.abort()  # the other threads raise BrokenBarrierError instead of waiting forever
            raise

    with ThreadPoolExecutor(threads, thread_name_prefix="bandwidth") as pool:
        spans = list(pool.map(read, range(threads)))
    seconds = min(max(s[p][1] for s in spans) - min(s[p][0] for s in spans) for p in range(passes))
    return words * 8 * threads / seconds / 1e9

"""How many intra-op threads a training process uses on a CPU.

`accelerate launch` exports OMP_NUM_THREADS=1 to the processes it starts (unless
`--num_cpu_threads_per_process` is given), which made one-process CPU training on a 2-core machine
about 40% slower (41 vs 70 img/s on the default profile). Each process takes an equal share of the
cores it may run on instead.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset restrict)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads_per_process(local_processes: int) -> int:
    """An equal share of the available cores for each of ``local_processes`` processes (at least one)."""
    return max(1, available_cores() // max(1, local_processes))

"""Intra-op threads: torch's OpenMP pool belongs to the one thread that drives the model.

libgomp gives every OS thread that opens a parallel region a team of worker threads of its
own, and once it manages more threads than there are CPUs it stops spinning between regions
(its "throttled" spin count is about a hundred iterations): from then on, every parallel
region of the model's thread ends in futex sleeps and wake-ups. One parallel op on a web
worker thread (checking a 345k-element prefix upload for NaNs) was enough to cut a 2-core
server's mixed-adapter throughput from 0.9x to 0.65x of the base model for the rest of its
life, measured with the load test. So torch work on any other thread runs `serial()`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def serial():
    """Run the enclosed torch ops on the calling thread alone (no OpenMP team is started).

    The thread count is a per-thread setting under OpenMP, so the model's thread keeps its
    own; the count is restored on exit.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

"""What ideal routing and ideal caches would load for a request stream (server.bench_fleet's
yardstick for the measured counts).

The stream is replayed one request at a time (no concurrency, no pinning) through 2 replicas,
each with a device tier and a host tier that are both LRU by use, as server.residency is:
  affinity   an adapter stays on the replica that read it while that replica holds it in
             host memory; a new (or dropped) adapter goes to the replica holding fewer, as
             Serve's router sends it to the replica with the fewest multiplexed ids
  plain      each request goes to a replica drawn at random
A measured count well above the replay's is a load that the mechanism (routing, reporting,
eviction) wasted; one near it is the workload and the cache sizes speaking.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class Loads:
    """Loads per 100 requests of the measured part of a stream, summed over the replicas."""

    disk: float
    """Reads from disk into host memory (host-tier misses)."""
    device: float
    """Loads from host memory into a device slot (device-tier misses)."""


class _Replica:
    def __init__(self, max_device: int, max_host: int):
        self.max_device, self.max_host = max_device, max_host
        self.device: OrderedDict[str, None] = OrderedDict()
        self.host: OrderedDict[str, None] = OrderedDict()
        self.disk = self.loads = 0

    def use(self, name: str) -> None:
        if name in self.host:
            self.host.move_to_end(name)
        if name in self.device:
            self.device.move_to_end(name)
            return
        if name not in self.host:
            self.disk += 1
            self.host[name] = None
            if len(self.host) > self.max_host:
                self.host.popitem(last=False)
        self.loads += 1
        self.device[name] = None
        if len(self.device) > self.max_device:
            self.device.popitem(last=False)


def replay(stream: list[str], measured_from: int, affinity: bool, max_device: int, max_host: int,
           replicas: int = 2, seed: int = 0) -> Loads:
    """Loads of stream[measured_from:], after stream[:measured_from] has filled the caches."""
    rng = np.random.default_rng(seed)
    reps = [_Replica(max_device, max_host) for _ in range(replicas)]
    owner: dict[str, int] = {}
    disk0 = loads0 = 0
    for i, name in enumerate(stream):
        if i == measured_from:
            disk0, loads0 = sum(r.disk for r in reps), sum(r.loads for r in reps)
        if not affinity:
            r = int(rng.integers(replicas))
        elif name in owner and name in reps[owner[name]].host:
            r = owner[name]
        else:
            fewest = min(len(x.host) for x in reps)
            r = owner[name] = int(rng.choice([j for j, x in enumerate(reps) if len(x.host) == fewest]))
        reps[r].use(name)
    per100 = 100 / max(len(stream) - measured_from, 1)
    return Loads(disk=(sum(r.disk for r in reps) - disk0) * per100,
                 device=(sum(r.loads for r in reps) - loads0) * per100)

"""server.fleet_replay, the yardstick server.bench_fleet measures affinity against."""

from server.bench_fleet import workload
from server.fleet_replay import replay


def test_affinity_reads_only_first_uses_once_the_fleet_holds_every_adapter_in_use():
    stream = workload(100, 600, alpha=1.0)
    first_uses = len(set(stream[300:]) - set(stream[:300])) * 100 / 300
    aff = replay(stream, 300, affinity=True, max_device=4, max_host=60)  # 120 disjoint slots >= 100
    plain = replay(stream, 300, affinity=False, max_device=4, max_host=60)
    assert aff.disk == first_uses < plain.disk  # plain balancing caches popular adapters twice


def test_more_cache_never_reads_more():
    stream = workload(200, 800, alpha=1.0)
    reads = [replay(stream, 400, affinity=True, max_device=4, max_host=h).disk for h in (8, 32, 128)]
    assert reads == sorted(reads, reverse=True)

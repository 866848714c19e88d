"""The store's torch work runs on web and loader threads: it must not start an OpenMP team of
its own there (a second team throttles libgomp's spinning for the model's thread; see
adapters.threads)."""

from __future__ import annotations

import os
import threading

import torch

from adapters.files import to_bytes
from adapters.prefix import PrefixConfig
from engine.config import ModelConfig
from adapters.base import Capacity
from server.store import Store
from tests.adapters.cases import Case, make
from tests.tiny import write_tiny_model


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_store_put_and_read_start_no_openmp_workers(tmp_path):
    # 8 layers x 2 (k, v) x 2 kv heads x 16 = 512 values per virtual token: 200 tokens make
    # tensors far above torch's parallel grain (32768), so a check on them would go parallel
    shape = ModelConfig.from_dir(write_tiny_model(tmp_path / "m", num_hidden_layers=8)).shape()
    ad = make(Case("big-prefix", "prefix", lambda: PrefixConfig(num_virtual_tokens=200)), shape)
    assert ad.tensors["prompt_embeddings"].numel() > 3 * 32768
    config, weights = to_bytes(ad)
    store = Store(tmp_path / "store", shape, capacity=Capacity(max_virtual_tokens=200))
    seen = {}

    def web_worker():  # a fresh thread, as FastAPI's threadpool and the loader use
        torch.set_num_threads(2)  # what a thread on a 2-core machine starts with
        before = _threads()
        e, _ = store.put("default", "big", config, weights)
        store.read(e)
        seen["added"] = _threads() - before
        seen["count"] = torch.get_num_threads()

    t = threading.Thread(target=web_worker)
    t.start()
    t.join()
    assert seen["added"] == 0, f"validation started {seen['added']} OpenMP worker thread(s)"
    assert seen["count"] == 2  # the thread's own setting is restored


def test_parallel_op_on_a_thread_does_start_workers():
    # the check above can fail: the same kind of op, not made serial, does start a worker
    seen = {}

    def worker():
        torch.set_num_threads(2)
        before = _threads()
        torch.isfinite(torch.randn(200_000)).all()
        seen["added"] = _threads() - before

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["added"] >= 1

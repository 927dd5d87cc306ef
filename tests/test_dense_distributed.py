"""dense_map on a dask.distributed LocalCluster of 2 worker processes: the model travels as a
.pt2 program loaded once per worker, and a worker killed mid-run loses nothing."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from fc2conv import dense_map

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _net():
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(),
                         nn.MaxPool2d(3, 2, ceil_mode=True),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
                         nn.Conv2d(8, 5, 4)).eval()


def _ref(net, image):
    import copy

    with torch.no_grad():
        return copy.deepcopy(net).double()(torch.from_numpy(image).double()[None])[0].numpy()


def _close(got, ref):
    got = np.asarray(got)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 256 * np.finfo(np.float32).eps * (np.abs(ref).max() + 1)


def test_client_runs_a_pt2_program_loaded_once_per_worker(client, tmp_path):
    net = _net()
    image = np.random.default_rng(0).standard_normal((3, 97, 121)).astype(np.float32)
    _close(dense_map(net, image, tile=60, scheduler=client), _ref(net, image))
    _close(dense_map(net, image, tile=50, out=tmp_path / "m.zarr", scheduler=client),
           _ref(net, image))

    def loaded():
        from fc2conv.dense import model

        return len(model._LOADED)

    counts = client.run(loaded)
    assert sorted(counts.values()) == [1, 1]  # one program, both runs, both workers


def test_worker_killed_mid_run_loses_nothing(client, tmp_path):
    net = _net()
    image = np.random.default_rng(1).standard_normal((3, 170, 150)).astype(np.float32)
    out = tmp_path / "killed.zarr"
    done_dir = out / ".fc2conv-done"
    state = {}

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if done_dir.exists() and len(list(done_dir.iterdir())) >= 2:
                pids = client.run(os.getpid)
                victim = sorted(pids.values())[0]
                state["done_at_kill"] = len(list(done_dir.iterdir()))
                os.kill(victim, signal.SIGKILL)
                state["killed"] = victim
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    calls = []
    result = dense_map(net, image, tile=40, out=out, scheduler=client,
                       progress=lambda d, t: calls.append((d, t)))
    thread.join()
    total = calls[0][1]
    assert "killed" in state and state["done_at_kill"] < total  # killed mid-run
    assert len(list(done_dir.iterdir())) == total
    _close(result, _ref(net, image))

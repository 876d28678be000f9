"""jdet.parallel on four simulated CPU devices (set in conftest.py)."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdet import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() != 4:
    pytest.skip("needs the 4 simulated CPU devices of conftest.py")
  return parallel.make_mesh()


def test_mesh_axis(mesh):
  assert mesh.axis_names == ("data",)
  assert mesh.devices.shape == (4,) and set(mesh.devices.tolist()) == set(jax.devices())
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  sub = parallel.make_mesh(jax.devices()[:2])
  assert sub.devices.shape == (2,)


def test_shard_batch_splits_rows_and_round_trips(mesh, rng):
  batch = {"image": rng.normal(size=(8, 5, 5, 3)).astype(np.float32),
           "labels": rng.integers(-1, 5, size=(8, 3)).astype(np.int32)}
  out = parallel.shard_batch(batch, mesh)
  for key, x in out.items():
    assert x.shape == batch[key].shape and x.dtype == batch[key].dtype
    assert x.sharding.is_equivalent_to(parallel.batch_sharding(mesh), x.ndim)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 4 and len({s.device for s in shards}) == 4
    for i, shard in enumerate(shards):  # device i holds rows 2i, 2i+1
      np.testing.assert_array_equal(np.asarray(shard.data), batch[key][2 * i:2 * i + 2])
  host = parallel.gather_to_host(out)
  for key in batch:
    assert isinstance(host[key], np.ndarray)
    np.testing.assert_array_equal(host[key], batch[key])
  with pytest.raises(ValueError, match="multiple of the 4 local devices"):
    parallel.shard_batch({"x": np.zeros((6, 2))}, mesh)


def test_jitted_sum_over_sharded_batch(mesh, rng):
  x = rng.normal(size=(12, 7)).astype(np.float32)
  w = rng.normal(size=(7,)).astype(np.float32)
  xs = parallel.shard_batch({"x": x}, mesh)["x"]
  ws = parallel.replicate(w, mesh)
  assert ws.sharding.is_fully_replicated and len(ws.addressable_shards) == 4
  total = jax.jit(lambda a, b: jnp.sum(a * b))(xs, ws)
  np.testing.assert_allclose(float(total), float(np.sum(x.astype(np.float64) * w)), rtol=1e-5)
  col = jax.jit(lambda a: jnp.sum(a, axis=0))(xs)
  np.testing.assert_allclose(parallel.gather_to_host(col), x.sum(0), rtol=1e-5, atol=1e-5)


def test_local_batch_size(monkeypatch):
  n = jax.device_count()
  assert parallel.local_batch_size(8 * n) == 8 * n  # one process
  with pytest.raises(ValueError, match="number of devices"):
    parallel.local_batch_size(4 * n + 2)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert parallel.local_batch_size(8 * n) == 4 * n
  with pytest.raises(ValueError, match="number of processes"):
    parallel.local_batch_size(8 * n + 1)


def test_initialize_distributed_is_noop_when_initialised(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  parallel.initialize_distributed("localhost:1234", 2, 0)
  assert calls == []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  parallel.initialize_distributed("localhost:1234", 2, 0)
  assert calls == [dict(coordinator_address="localhost:1234", num_processes=2, process_id=0,
                        local_device_ids=None)]


_WORKER = """
import os, sys
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np
from jdet import parallel
pid = int(sys.argv[1])
parallel.initialize_distributed(sys.argv[2], 2, pid)
parallel.initialize_distributed(sys.argv[2], 2, pid)  # already initialised: a no-op
import jax, jax.numpy as jnp
mesh = parallel.make_mesh()
assert mesh.devices.shape == (4,)
rows = parallel.local_batch_size(8)
x = np.arange(24, dtype=np.float32).reshape(8, 3)
g = parallel.shard_batch({"x": x[pid * rows:(pid + 1) * rows]}, mesh)["x"]
w = parallel.replicate(np.arange(3, dtype=np.float32), mesh)
s = jax.jit(lambda a, b: a @ b)(g, w)
host = parallel.gather_to_host({"s": s, "g": g, "w": w, "local": np.full(2, pid)})
np.testing.assert_array_equal(host["s"], x @ np.arange(3))
np.testing.assert_array_equal(host["g"], x)
np.testing.assert_array_equal(host["w"], np.arange(3))
np.testing.assert_array_equal(host["local"], [0, 0, 1, 1])
print("worker ok", rows)
"""


@pytest.mark.slow
def test_two_processes_share_a_global_batch(tmp_path):
  """Two processes x two CPU devices: each feeds half of the batch (gloo collectives)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    address = f"localhost:{s.getsockname()[1]}"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), address], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0 and "worker ok 4" in out, out[-3000:]

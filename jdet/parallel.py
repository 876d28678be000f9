"""Devices and hosts: one data-parallel mesh, global batches, replicated state.

Training is data parallel under ``jax.jit`` (no ``pmap``, no ``shard_map``):

* one mesh over every device of every process, with a single axis ``"data"``
  of type ``Auto`` (``jax.make_mesh`` defaults to ``Explicit`` since 0.9, which
  sharding-oblivious code does not tolerate);
* batches are sharded on ``"data"`` (``P("data")``): each device holds
  ``global_batch / device_count`` images;
* parameters, optimiser state and BatchNorm statistics are replicated
  (``P()``); XLA inserts the gradient all-reduce, and BatchNorm statistics are
  global over the batch (SyncBN).

With several hosts, each process calls :func:`initialize_distributed` first,
reads ``local_batch_size(global)`` images of its own share of the data and
turns them into global arrays with :func:`shard_batch`. On one host all of
this degenerates to a plain ``device_put``.

Shapes: ``batch[k]`` is ``[B_local, ...]`` on each process; the global array is
``[B_local * process_count, ...]``, process ``p`` owning rows
``p * B_local ... (p + 1) * B_local - 1``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "initialize_distributed", "make_mesh", "batch_sharding",
           "replicated_sharding", "local_batch_size", "shard_batch", "replicate", "gather_to_host",
           "mesh_context", "all_processes_agree"]

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | int | None = None) -> None:
  """``jax.distributed.initialize`` unless it has been called already.

  Call it before any other JAX call. With all arguments ``None`` JAX detects
  the cluster (SLURM, Open MPI, TPU pods, ...).
  """
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh ``("data",)`` over ``devices`` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``"data"``, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch: ``global / process_count``.

  Raises:
    ValueError: the global batch does not divide by the number of processes
      or by the number of devices.
  """
  processes, devices = jax.process_count(), jax.device_count()
  if global_batch_size % processes:
    raise ValueError(f"the global batch size {global_batch_size} does not divide by the "
                     f"number of processes ({processes})")
  if global_batch_size % devices:
    raise ValueError(f"the global batch size {global_batch_size} does not divide by the "
                     f"number of devices ({devices}); use a multiple of {devices}")
  return global_batch_size // processes


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the batch -> global arrays sharded on ``"data"``.

  Args:
    batch: ``{key: [B_local, ...]}`` host arrays, ``B_local`` a multiple of the
      number of this process's devices in ``mesh``.
    mesh: from :func:`make_mesh`.

  Returns:
    ``{key: [B_local * process_count, ...]}`` global ``jax.Array`` s.
  """
  sharding = batch_sharding(mesh)
  local_devices = len(sharding.addressable_devices)

  def put(key, x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_devices:
      raise ValueError(f"batch[{key!r}] has shape {x.shape}: its leading dimension must be a "
                       f"multiple of the {local_devices} local devices")
    return jax.make_array_from_process_local_data(sharding, x)

  return {k: put(k, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` copied to every device of ``mesh`` (the same values on every process)."""
  return jax.device_put(tree, replicated_sharding(mesh))


def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))  # no communication needed
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_to_host(tree: Any) -> Any:
  """A tree of arrays as NumPy arrays on this host, with their global values.

  Global arrays (sharded over several processes) come back whole. Host-local
  arrays (NumPy or fully addressable) on several processes are concatenated
  along axis 0 in process order. With several processes this is a collective:
  every process must call it with the same tree structure and shapes.
  """
  return jax.tree.map(_to_host, tree)


def mesh_context(mesh):
  """``jax.set_mesh(mesh)`` as a context manager (jax >= 0.7), else the mesh itself."""
  set_mesh = getattr(jax, "set_mesh", None)
  return set_mesh(mesh) if set_mesh is not None else mesh


def all_processes_agree(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (a collective with several processes)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))

"""Multi-host start-up: `jax.distributed.initialize` from command-line flags and the cluster's environment.

Every host runs the same program; `initialize` must run before anything touches a device. Modes:

  auto        (default) SLURM with more than one task (slurm_node when there is one task per node and the node
              has several GPUs, else slurm); else explicit flags ("explicit": all three below are needed); else
              a Cloud TPU VM (jax's own detection of the TPU metadata); else one process, nothing initialized.
  off         never initialize (one process; also the way out of a wrong detection).
  tpu         `jax.distributed.initialize()`: jax reads coordinator, process count and id from the TPU VM.
  slurm       jax reads SLURM's variables; one process per task, each driving the GPU of its SLURM_LOCALID.
  slurm_node  SLURM with one process per node driving all of the node's GPUs (`local_device_ids` = every
              GPU that SLURM or CUDA_VISIBLE_DEVICES shows, or --local_device_ids).

Explicit flags (--coordinator_address, --num_processes, --process_id, --local_device_ids) always win; under a
cluster the missing ones come from its environment, without one all of the first three are required.

`global_array` and `host_array` move host data into and out of jitted functions on a mesh that spans several
processes (with one process they are plain device_put / np.asarray); `agree` gives every process process 0's
answer to a question that decides which collectives come next.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger("sami_jax")

MODES = ("auto", "off", "tpu", "slurm", "slurm_node")
# What jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(ValueError):
    """The distributed flags contradict each other or the environment; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do: mode "off" (nothing) or the arguments of `jax.distributed.initialize`
    (None = jax fills it in from the cluster's environment)."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _in_slurm(env: Mapping[str, str]) -> bool:
    return all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1


def _on_cloud_tpu() -> bool:
    """jax's own test for a Cloud TPU VM (GCE or GKE) whose metadata names the workers."""
    try:
        from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster, GkeTpuCluster
    except ImportError:  # private module; the launch script passes --distributed=tpu and never relies on this
        return False
    return GceTpuCluster.is_env_present() or GkeTpuCluster.is_env_present()


def _node_gpus(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """Local ordinals of this node's GPUs (CUDA renumbers the visible ones from 0), or None if unknown."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return tuple(range(len(visible.split(","))))
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return tuple(range(int(env["SLURM_GPUS_ON_NODE"])))
    return None


def _parse_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise DistributedError(f"--local_device_ids must be comma-separated integers, got {text!r}") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise DistributedError(f"--local_device_ids must be distinct non-negative integers, got {text!r}")
    return ids


def plan(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, local_device_ids: str | None = None,
         env: Mapping[str, str] | None = None) -> Plan:
    """Decides how to initialize from the flags and the environment (`os.environ` by default), checking
    the flags against each other; touches no device and no network except jax's TPU metadata test."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise DistributedError(f"--distributed must be one of {MODES}, got {mode!r}")
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id, "--local_device_ids": local_device_ids}
    given = {k: v for k, v in given.items() if v not in (None, "")}
    if mode == "off":
        if given:
            raise DistributedError(f"--distributed=off contradicts {', '.join(given)}")
        return Plan("off")
    if coordinator_address:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise DistributedError(f"--process_id must be >= 0, got {process_id}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise DistributedError(f"--process_id={process_id} must be < --num_processes={num_processes} "
                               "(ids count from 0)")
    ids = _parse_ids(local_device_ids) if local_device_ids else None

    if mode == "auto":
        if _in_slurm(env):
            one_per_node = env["SLURM_NTASKS"] == env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES"))
            mode = "slurm_node" if one_per_node and len(_node_gpus(env) or ()) > 1 else "slurm"
        elif given.keys() - {"--local_device_ids"}:
            mode = "explicit"
        elif _on_cloud_tpu():
            mode = "tpu"
        elif given:
            raise DistributedError("--local_device_ids alone starts nothing: also pass --coordinator_address, "
                                   "--num_processes and --process_id (or run under SLURM)")
        else:
            return Plan("off")
    if mode in ("slurm", "slurm_node") and not all(v in env for v in _SLURM_VARS):
        missing = [v for v in _SLURM_VARS if v not in env]
        raise DistributedError(f"--distributed={mode} needs SLURM's environment (run it under srun); "
                               f"{', '.join(missing)} not set")
    if mode == "slurm_node" and ids is None:
        ids = _node_gpus(env)
        if ids is None:
            raise DistributedError("--distributed=slurm_node: cannot tell this node's GPUs (neither "
                                   "CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE is set); pass --local_device_ids")
    if mode == "explicit":
        missing = [k for k in ("--coordinator_address", "--num_processes", "--process_id") if k not in given]
        if missing:
            raise DistributedError(f"{', '.join(given)} given without {', '.join(missing)}: outside SLURM and "
                                   "Cloud TPU every process needs all three")
    return Plan(mode, coordinator_address or None, num_processes, process_id, ids)


def initialize(p: Plan) -> None:
    """Runs `jax.distributed.initialize` as planned (nothing for mode "off"); call it before any device use."""
    if p.mode == "off":
        return
    kwargs = {"coordinator_address": p.coordinator_address, "num_processes": p.num_processes,
              "process_id": p.process_id, "local_device_ids": list(p.local_device_ids) if p.local_device_ids else None}
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    log.info("jax.distributed (%s): process %d of %d, %d local of %d devices", p.mode, jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


# ------------------------------------------------------------------------------------------------ global arrays
# With several processes a jitted function takes and returns global arrays that span every process's devices.
# Every process holds the same host data (same config, seed and files), so each builds its own shards of an
# input from its copy, and an output is all-gathered before the host reads it.
def global_array(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """Host data held identically by every process (a numpy array, or a jax PRNG key array) as one jax.Array
    with `sharding`; each process fills only its own devices' shards, nothing crosses processes."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(global_array(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def host_array(x) -> np.ndarray:
    """The whole value of `x` on this host. An array sharded across processes is all-gathered (a collective:
    every process must call this at the same point)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def agree(flag: bool) -> bool:
    """Process 0's `flag` on every process (a collective with several processes). For decisions that every
    process must take alike, such as whether a file that only process 0 writes exists yet."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))

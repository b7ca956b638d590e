"""The main job: SAMI end to end from a config file.

    python -m sami_jax.main --config=configs/smollm2_hh.py --workdir=/tmp/run [--config.train.iterations=1]

The same command with the same --workdir resumes a killed or preempted run where it stopped. Config
files are ml_collections files with `get_config()` (configs/); the dict is locked, so an override of a
key that does not exist is an error.

Multi-host: run the same command on every host. `--distributed` (default auto) initializes
`jax.distributed` on Cloud TPU VMs and under SLURM by itself; elsewhere pass --coordinator_address,
--num_processes and --process_id (see sami_jax/distributed.py and launch/).
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from sami_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory, local or gs://; rerun with the same one to resume")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "how to start jax.distributed: auto (SLURM, explicit flags, Cloud TPU, else one "
                                 "process), off, tpu, slurm (a process per GPU), slurm_node (a process per node)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's id, 0 .. num_processes-1")
_LOCAL_DEVICE_IDS = flags.DEFINE_string("local_device_ids", None,
                                        "comma-separated local GPU ordinals this process drives (default: all, "
                                        "or the one of SLURM_LOCALID under --distributed=slurm)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    log = logging.getLogger("sami_jax")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    try:  # before anything touches a device
        distributed.initialize(distributed.plan(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                                _PROCESS_ID.value, _LOCAL_DEVICE_IDS.value))
    except distributed.DistributedError as e:
        raise app.UsageError(str(e)) from e
    from sami_jax.train import Preempted, TrainingError, run, summary

    try:
        report = run(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        print(f"preempted ({e}); rerun the same command to resume from {_WORKDIR.value}", file=sys.stderr)
        sys.exit(0)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:  # the other processes would print the same
        print(summary(_WORKDIR.value))
        print(f"report: {report}")


if __name__ == "__main__":
    app.run(main)

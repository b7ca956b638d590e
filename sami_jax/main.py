"""The main job: SAMI end to end from a config file.

    python -m sami_jax.main --config=configs/smollm2_hh.py --workdir=/tmp/run [--config.train.iterations=1]

The same command with the same --workdir resumes a killed or preempted run where it stopped. Config
files are ml_collections files with `get_config()` (configs/); the dict is locked, so an override of a
key that does not exist is an error.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory, local or gs://; rerun with the same one to resume")
flags.mark_flags_as_required(["config", "workdir"])


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
    from sami_jax.train import Preempted, TrainingError, run, summary

    try:
        report = run(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        print(f"preempted ({e}); rerun the same command to resume from {_WORKDIR.value}", file=sys.stderr)
        sys.exit(0)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(summary(_WORKDIR.value))
    print(f"report: {report}")


if __name__ == "__main__":
    app.run(main)

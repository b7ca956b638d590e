"""An OpenAI-compatible HTTP server on the Sampler, so any OpenAI client can talk to a model.

    python -m sami_jax.serve --model=PATH --port=8000 [--host=127.0.0.1] [--max-batch=16] \\
        [--batch-wait-ms=10] [--served-name=NAME] [--default-max-tokens=512] [--quiet]

Endpoints: GET /v1/models, GET /v1/models/NAME, POST /v1/completions, POST /v1/chat/completions
(no streaming, n=1, no logprobs; `top_k` is an extension, 0 or -1 = off). Omitted fields take OpenAI's
defaults: temperature 1, top_p 1, max_tokens 16 for completions; a chat answer may run to
--default-max-tokens (or the end of the context, if sooner).

    server = start(load_model(path), port=0)       # in-process, e.g. in tests
    openai.OpenAI(base_url=server.url, api_key="-").completions.create(model=server.served_name, prompt="Hi")
    server.shutdown()

Concurrency: HTTP handler threads validate and tokenize a request, then queue one item per prompt. A single
worker thread owns the Sampler (every JAX call happens there): it collects the items that share sampling
settings and arrived within --batch-wait-ms (at most --max-batch), runs one `Sampler.generate` on them with
the batch padded to a power-of-two size (so compiled programs are reused), and hands each row back.
Left padding with per-row positions makes a greedy row's answer the same as that prompt generated alone.
Greedy requests batch whatever their seed, top_k and top_p; sampled requests without a seed batch together
under a fresh seed per batch; a sampled request with a seed runs alone (its prompts as one batch), so it is
reproducible.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import http.server
import itertools
import json
import pathlib
import queue
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence

from sami_jax.sampling import DEFAULT_BUCKETS, Generation, Sampler, SamplingParams

DEFAULT_MAX_BATCH = 16
DEFAULT_BATCH_WAIT_MS = 10.0
DEFAULT_CHAT_MAX_TOKENS = 512
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 32 << 20
_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` with {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


# ------------------------------------------------------------------------------------------- chat template
class _TemplateError(Exception):
    pass


def _raise_exception(message):  # what HF passes to templates (e.g. "roles must alternate user/assistant")
    raise _TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same settings as tokenizer.apply_chat_template (so one user turn renders identically); sandboxed because
    # a template is code shipped inside a model file.
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[dict], bos: str = "", eos: str = "",
                add_generation_prompt: bool = True) -> str:
    """A whole conversation (dicts with "role" and "content") rendered with a jinja chat template, ready for
    the assistant's answer: `tokenizer.apply_chat_template` generalised to many turns (one user turn after an
    optional system message renders the same). bos/eos fill templates that write those tokens as text."""
    return _compiled_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                               bos_token=bos, eos_token=eos)


def _eos_text(tokenizer) -> str:
    """The EOS token as text when the tokenizer reads that text back as exactly the EOS id (HF tokenizers match
    special tokens in text), so templates that close turns with {{ eos_token }} tokenize as in transformers;
    else "" (sentencepiece reads "</s>" as plain text), as tokenizer.apply_chat_template does."""
    eos = tokenizer.eos_ids[0]
    try:
        text = tokenizer.decode([eos], skip_special_tokens=False)
        return text if text and tokenizer.encode(text) == [eos] else ""
    except (ValueError, TypeError):
        return ""


# ------------------------------------------------------------------------------------------ request parsing
def _field(body: dict, name: str, kind, default=None, param: str | None = None):
    """body[name] checked against `kind` (a type or tuple of types); null or absent -> default."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass, but `"max_tokens": true` is a client bug, not 1
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds).replace("float", "number").replace("str", "string")
        raise _bad(f"{name} must be {names}, got {json.dumps(value)[:80]}", param or name)
    return value


def _reject_unsupported(body: dict) -> None:
    """Options that would silently change the answer if ignored are refused; other unknown fields are ignored."""
    if body.get("stream"):
        raise _bad("stream is not supported; send stream=false", "stream")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad(f"n must be 1 (one choice per prompt), got {json.dumps(n)}", "n")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of is not supported (only 1)", "best_of")
    for name in ("logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, 0, "", {}, []):
            raise _bad(f"{name} is not supported by this server", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"{name} is not supported (only 0)", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format is not supported (only {\"type\": \"text\"})", "response_format")


def _sampling_params(body: dict, max_tokens: int) -> SamplingParams:
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    if temperature < 0:
        raise _bad(f"temperature must be >= 0 (0 = greedy), got {temperature}", "temperature")
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    if not 0 < top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _field(body, "top_k", int, 0)
    if top_k < -1:
        raise _bad(f"top_k must be >= 0 (0 or -1 = off), got {top_k}", "top_k")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a non-empty string or a list of non-empty strings", "stop")
    seed = _field(body, "seed", int, 0)
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                          stop=tuple(dict.fromkeys(stop)), seed=seed)


def _requested_max_tokens(body: dict, *names: str) -> int | None:
    for name in names:
        value = _field(body, name, int)
        if value is not None:
            if value < 1:
                raise _bad(f"{name} must be >= 1, got {value}", name)
            return value
    return None


def _completion_prompts(body: dict) -> list:
    """The prompts of a /v1/completions body: strings, or token-id lists (OpenAI accepts both)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("missing required field prompt (a string or a list of strings)", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p)) for p in prompt):
        return prompt
    raise _bad("prompt must be a string, a non-empty list of strings, or token ids", "prompt")


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("missing required field messages (a non-empty list of {role, content})", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = _CHAT_ROLES.get(m.get("role"))
        if role is None:
            raise _bad(f"messages[{i}].role must be one of {sorted(_CHAT_ROLES)}, got {json.dumps(m.get('role'))}",
                       f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


# ----------------------------------------------------------------------------------------------- batching
@dataclasses.dataclass(eq=False)
class _Item:
    """One prompt waiting for the worker. Items with equal `group` may share a batch."""

    ids: list[int]
    sp: SamplingParams
    group: tuple
    fresh_seed: bool  # sampled without a client seed: the worker draws one per batch
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


def batch_bucket(n: int, max_batch: int) -> int:
    """The batch size `n` rows run at: the next power of two, at most max_batch (fewer shapes to compile)."""
    size = 1
    while size < n:
        size *= 2
    return min(size, max_batch)


class BatchWorker:
    """Owns the Sampler on one thread; `submit` queues items from any thread and returns their futures.

    Counters (read them from any thread): batches_run, rows_run and batch_sizes (rows per batch, the last 1024).
    """

    def __init__(self, sampler: Sampler, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.sampler = sampler
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.batches_run = 0
        self.rows_run = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1024)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # nothing is queued behind the stop sentinel, so no request hangs
        self._rng = random.Random()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sami_jax-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[_Item]) -> list[concurrent.futures.Future]:
        with self._submit_lock:
            if self._stopping.is_set():
                raise APIError(503, "the server is shutting down", type="server_error")
            for item in items:
                self._queue.put(item)
        return [item.future for item in items]

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the batch in progress, fails whatever is still queued (503) and ends the thread."""
        with self._submit_lock:
            self._stopping.set()
            self._queue.put(None)
        self._thread.join(timeout)

    # The worker thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        backlog: collections.deque[_Item] = collections.deque()  # arrived, not yet run (arrival order)
        while True:
            if not backlog:
                item = self._queue.get()
                if item is None:
                    break
                backlog.append(item)
            if not self._collect(backlog):
                break
            group = backlog[0].group  # the oldest item's settings go first, so nothing starves
            batch = list(itertools.islice((x for x in backlog if x.group == group), self.max_batch))
            taken = set(map(id, batch))
            backlog = collections.deque(x for x in backlog if id(x) not in taken)
            self._run(batch)
        for item in backlog:
            item.future.set_exception(APIError(503, "the server shut down before this request ran",
                                               type="server_error"))

    def _collect(self, backlog: collections.deque) -> bool:
        """Moves queued items to the backlog until the oldest item has waited batch_wait_s or its group is
        full; False when a stop was requested."""
        deadline = backlog[0].arrived + self.batch_wait_s
        while True:
            group = backlog[0].group
            if sum(x.group == group for x in backlog) >= self.max_batch:
                return True
            wait = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            backlog.append(item)

    def _run(self, batch: list[_Item]) -> None:
        sp = batch[0].sp
        if batch[0].fresh_seed:
            sp = dataclasses.replace(sp, seed=self._rng.randrange(2**31))
        try:
            results = self.sampler.generate([x.ids for x in batch], sp,
                                            batch_size=batch_bucket(len(batch), self.max_batch))
        except Exception as e:  # answered as a 500; the server keeps serving
            for x in batch:
                x.future.set_exception(e)
        else:
            for x, r in zip(batch, results, strict=True):
                x.future.set_result(r)
        self.batches_run += 1
        self.rows_run += len(batch)
        self.batch_sizes.append(len(batch))


# -------------------------------------------------------------------------------------------------- server
class Server:
    """A running server: `url` (ending in /v1), `served_name`, `worker` (its batch counters) and `shutdown()`.

    Build it with `start`. Usable as a context manager.
    """

    def __init__(self, model, served_name: str, host: str, port: int, max_batch: int, batch_wait_ms: float,
                 default_max_tokens: int, log_requests: bool, buckets: Sequence[int], chunk: int):
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; the server needs one to read prompts and write text")
        self.model = model
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        self.log_requests = log_requests
        self.created = int(time.time())
        self.sampler = Sampler(model, buckets=buckets, chunk=chunk)
        self.tokenizer = model.tokenizer
        self.context_len = model.config.max_position_embeddings
        self.worker = BatchWorker(self.sampler, max_batch, batch_wait_ms)
        self._eos_text = _eos_text(self.tokenizer)
        server_class = _IPv6HTTPServer if ":" in host else http.server.ThreadingHTTPServer
        try:
            self.httpd = server_class((host, port), _Handler)
        except OSError:
            self.worker.stop()
            raise
        self.httpd.app = self
        self.host, self.port = host, self.httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sami_jax-serve-http", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def batches_run(self) -> int:
        """Sampler.generate calls made so far (one per batch of concurrent prompts)."""
        return self.worker.batches_run

    def shutdown(self) -> None:
        """Stops accepting connections, lets the batch in progress finish, and fails anything still queued."""
        if self._closed:
            return
        self._closed = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.worker.stop()
        self._thread.join()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # Endpoints ----------------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    def _model_card(self) -> dict:
        return {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "sami_jax",
                "max_model_len": self.context_len}

    def model_card(self, name: str) -> dict:
        if name != self.served_name:
            raise APIError(404, f"model {name!r} not found; this server serves {self.served_name!r}", "model",
                           type="not_found_error")
        return self._model_card()

    def completions(self, body: dict) -> dict:
        self._check_common(body)
        prompts = _completion_prompts(body)
        max_tokens = _requested_max_tokens(body, "max_tokens")
        sp = _sampling_params(body, max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS)
        rows = self._encode(prompts, "prompt")
        self._check_context(rows, sp.max_new_tokens, "max_tokens")
        results = self._generate(rows, sp, body)
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": _FINISH_REASONS[r.finish_reason]}
                   for i, r in enumerate(results)]
        return self._response("cmpl", "text_completion", choices, rows, results)

    def chat_completions(self, body: dict) -> dict:
        self._check_common(body)
        messages = _chat_messages(body)
        template = self.tokenizer.chat_template
        if not template:
            raise _bad(f"model {self.served_name!r} has no chat template; use /v1/completions with a raw prompt",
                       "messages")
        try:
            text = render_chat(template, messages, eos=self._eos_text)
        except Exception as e:  # jinja errors and the template's own raise_exception
            raise _bad(f"the model's chat template rejected these messages: {e}", "messages") from None
        rows = self._encode([text], "messages")
        max_tokens = _requested_max_tokens(body, "max_completion_tokens", "max_tokens")
        if max_tokens is None:  # OpenAI: up to the end of the context; here also at most default_max_tokens
            max_tokens = max(1, min(self.default_max_tokens, self.context_len - len(rows[0])))
        sp = _sampling_params(body, max_tokens)
        self._check_context(rows, sp.max_new_tokens, "max_tokens")
        results = self._generate(rows, sp, body)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": _FINISH_REASONS[r.finish_reason]} for i, r in enumerate(results)]
        return self._response("chatcmpl", "chat.completion", choices, rows, results)

    # Helpers -------------------------------------------------------------------------------------------
    def _check_common(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.served_name:  # absent: the one model served
            raise _bad(f"unknown model {name!r}; this server serves {self.served_name!r}", "model")
        _reject_unsupported(body)

    def _encode(self, prompts: list, param: str) -> list[list[int]]:
        """Token ids per prompt (BOS as the tokenizer adds by default), each within the model's maximum."""
        for p in prompts:
            if not isinstance(p, str) and any(not 0 <= t < self.tokenizer.vocab_size for t in p):
                raise _bad(f"{param}: token ids must be in [0, {self.tokenizer.vocab_size})", param)
        try:
            rows, dropped = self.sampler.encode_prompts(prompts, truncate=True)  # tokenizer only, no JAX
        except ValueError as e:
            raise _bad(f"{param}: {e}", param) from None
        limit = min(self.context_len, self.sampler.buckets[-1])
        for i, (r, d) in enumerate(zip(rows, dropped, strict=True)):
            if d:
                which = f"{param}[{i}]" if len(prompts) > 1 else param
                raise _bad(f"{which} has {len(r) + d} tokens, more than this model's maximum of {limit}", param)
        return rows

    def _check_context(self, rows: list[list[int]], max_tokens: int, param: str) -> None:
        longest = max(len(r) for r in rows)
        if longest + max_tokens > self.context_len:
            raise _bad(f"this model's context is {self.context_len} tokens; the prompt has {longest} and "
                       f"{param} asks for {max_tokens} more", param)

    def _generate(self, rows: list[list[int]], sp: SamplingParams, body: dict) -> list[Generation]:
        seeded = body.get("seed") is not None
        if sp.temperature == 0:  # seed, top_k and top_p change nothing: greedy requests batch (and compile) alike
            sp = dataclasses.replace(sp, seed=0, top_k=0, top_p=1.0)
            group, fresh = ("greedy", sp), False
        elif seeded:  # reproducible: this request's prompts run together, never with other requests'
            group, fresh = ("seeded", uuid.uuid4().hex, sp), False
        else:
            group, fresh = ("sampled", sp), True
        futures = self.worker.submit([_Item(ids=r, sp=sp, group=group, fresh_seed=fresh) for r in rows])
        return [f.result() for f in futures]

    def _response(self, prefix: str, obj: str, choices: list, rows, results: list[Generation]) -> dict:
        prompt_tokens = sum(len(r) for r in rows)
        completion_tokens = sum(r.length for r in results)
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": self.served_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


class _IPv6HTTPServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: OpenAI clients reuse connections
    server_version = "sami_jax"
    timeout = 300  # an idle kept-alive connection frees its thread after this many seconds

    @property
    def app(self) -> Server:
        return self.server.app

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._answer(lambda: self.app.models())
        elif path.startswith("/v1/models/"):
            self._answer(lambda: self.app.model_card(path[len("/v1/models/"):]))
        elif path == "/health":
            self._answer(lambda: {"status": "ok"})
        else:
            self._answer(lambda: self._not_found())

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            raw = self._read_body()
        except APIError as e:
            self.close_connection = True  # the body was not read, so the stream is out of step
            self._send(e.status, e.body())
            return
        routes = {"/v1/completions": self.app.completions, "/v1/chat/completions": self.app.chat_completions}
        if path not in routes:
            self._answer(lambda: self._not_found())
            return
        self._answer(lambda: routes[path](self._parse(raw)))

    def _not_found(self):
        raise APIError(404, f"no route {self.command} {self.path}; try GET /v1/models, POST /v1/completions or "
                       "POST /v1/chat/completions", type="not_found_error")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise _bad(f"bad Content-Length {length!r}") from None
        if not 0 <= n <= MAX_BODY_BYTES:
            raise APIError(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
        return self.rfile.read(n)

    @staticmethod
    def _parse(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    def _answer(self, fn) -> None:
        try:
            status, payload = 200, fn()
        except APIError as e:
            status, payload = e.status, e.body()
        except Exception as e:  # a bug or a failed generation: 500, keep serving
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            status, payload = err.status, err.body()
        self._send(status, payload)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            self.close_connection = True

    def log_message(self, format, *args):
        if self.app.log_requests:
            super().log_message(format, *args)


def start(model, host: str = "127.0.0.1", port: int = 0, served_name: str | None = None,
          max_batch: int = DEFAULT_MAX_BATCH, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
          default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS, log_requests: bool = False,
          buckets: Sequence[int] = DEFAULT_BUCKETS, chunk: int = 16) -> Server:
    """Serves `model` (a loaded Model, or a path for load_model) on host:port (0 = a free port) from background
    threads and returns at once; the Server's `url` is the OpenAI base URL, `shutdown()` stops it.
    served_name: the model id clients send (default: the path's name, or "model"). buckets and chunk go to the
    Sampler (prompt-length buckets; decode steps per compiled chunk)."""
    if isinstance(model, str | pathlib.Path):
        from sami_jax.api import load_model

        path = pathlib.Path(model)
        served_name = served_name or (path.stem if path.suffix == ".gguf" else path.name)
        model = load_model(path)
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
    return Server(model, served_name or "model", host, port, max_batch, batch_wait_ms, default_max_tokens,
                  log_requests, buckets, chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sami_jax.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder, .gguf file or orbax model folder")
    parser.add_argument("--port", type=int, required=True, help="0 = any free port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most prompts per batch")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                        help="how long the first prompt of a batch waits for others")
    parser.add_argument("--served-name", help="model id clients send (default: the model file or folder name)")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_CHAT_MAX_TOKENS,
                        help="most tokens of a chat answer when the request gives no max_tokens")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    if not pathlib.Path(args.model).exists():
        parser.error(f"{args.model}: no such file or folder")
    if args.max_batch < 1 or args.batch_wait_ms < 0 or args.default_max_tokens < 1:
        parser.error("--max-batch and --default-max-tokens must be >= 1, --batch-wait-ms >= 0")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = start(args.model, args.host, args.port, args.served_name, args.max_batch, args.batch_wait_ms,
                       args.default_max_tokens, log_requests=not args.quiet)
    except OSError as e:
        print(f"cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"serving {server.served_name!r} at {server.url} (OpenAI-compatible; Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.5):  # a timed wait, so Ctrl-C is seen promptly
            pass
    except KeyboardInterrupt:
        pass
    print("shutting down", file=sys.stderr, flush=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

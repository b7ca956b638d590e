"""Run by tests/test_evaluate_real.py in its own process (XLA's default optimization: the 135M model's prefill
of 8 x 640 tokens runs twice as fast as under the suite's level 0). Judges the n real pairs given on the
command line with the local judge and, through `sami_jax.serve` on loopback, with the openai: judge; writes
both judgment lists to OUT as JSON."""

import json
import pathlib
import sys

import sami_jax
from sami_jax import judge as J
from sami_jax import serve


def main(gguf, candidate, baseline, n, out):
    pairs = sorted(J.pair_up(J.read_responses(candidate), J.read_responses(baseline)),
                   key=lambda p: len(p.query) + len(p.candidate) + len(p.baseline))[: int(n)]
    model = sami_jax.load_model(gguf)
    batch = 2 * len(pairs)  # both orders of every pair in one batch
    buckets = (640, 1024)  # the shortest posts' judge prompts are 530-600 tokens
    local = J.LocalJudge("smollm2", model=model, max_tokens=8, batch_size=batch, buckets=buckets)
    server = serve.start(model, host="127.0.0.1", port=0, max_batch=batch, batch_wait_ms=5000, buckets=buckets)
    try:
        remote = J.make_judge(f"openai:{server.url}:{server.served_name}", timeout=600, retries=1, max_tokens=8)
        out = pathlib.Path(out)
        J.judge_pairs(pairs, local, "tldr", out / "local")
        J.judge_pairs(pairs, remote, "tldr", out / "remote")
        batches = server.batches_run
    finally:
        server.shutdown()
    (out / "server.json").write_text(json.dumps({"batches": batches}))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Training speed: our `sami_step` vs the same SAMI step written in PyTorch on HF transformers, same
weights, sequences, loss and AdamW (with clipping), in one run.

    python benchmarks/sami_step.py [--json PATH] [--threads N]          # CPU: SmolLM2-135M, float32
    python benchmarks/sami_step.py --setting gpu-1.1b [--json PATH]      # GPU: 1.1B-shaped, bf16

cpu (default): the real SmolLM2-135M-Instruct GGUF in float32; 4 queries x 2 constitutions x 2 responses
  of 256 tokens, from 8 real HH-RLHF dialogues: pair (k, j) of query q is the first 96 tokens of dialogue
  (q, k) (the "prompt") followed by tokens 96-255 of dialogue (q, j) (the response, which the loss covers),
  so that, as in SAMI, every prompt meets every response of its query. `--prompt-len` moves the split.
gpu-1.1b: a TinyLlama-1.1B-shaped random model (HF's init, imported through our HF path); float32 master
  weights, bfloat16 compute (ours: compute_dtype; torch: autocast); 16 queries x 2 x 2 = 64 sequences of
  512 tokens (random 128-token prompts and 384-token responses, paired the same way) in 4 accumulated
  micro-batches of 4 queries. MFU = train FLOPs (sami_jax.perf.train_flops: the vocabulary projection
  counted for the scored tokens only, for both sides) / time / peak: the FLOPs of the pairs, also for the
  variant that shares prompts. Ours runs with the einsum attention, with each prompt shared by its
  responses (`prompts_shared`: the same loss from fewer tokens) and, on a GPU, with cuDNN flash attention
  (`attention_impl`), each a record (cpu: the pairs with no remat in one batch, and the prompts shared with
  remat "dots_no_batch" in 4 micro-batches of 1 query, the same update); `--variants` picks others (e.g. fewer,
  larger micro-batches for ours alone), and `--profile DIR` tabulates the device ops of one step of the
  last (benchmarks/op_profile.py).

The reference is the authors' step in plain PyTorch: per micro-batch a forward over the q*c*c sequences,
token log-probs in float32, masked mean per sequence, the [q, c, c] matrix, the symmetric InfoNCE loss,
backward; then clip_grad_norm_(1.0) and AdamW. Each side runs `--warmup` (2) warm-up steps (ours: the first
compiles, its time is printed apart), then `--rounds` rounds of `--steps` timed steps: on cpu 3 rounds by default,
the reference and every variant kept in memory and timed in turn, in alternating order, so that the VM's swings
in speed (up to 1.8x within an hour on the 2-core VMs) fall on both sides of each round's ratio; the ratio printed
is the median of the rounds'. Losses of the first step are compared too. With `--malloc keep` glibc serves every
allocation from one heap and keeps what is freed, so that neither side pays the machine's page faults anew at
every step for its large buffers (the reference's logits; XLA's temporaries, which its worker threads took from
glibc arenas that map any request over 64 MB afresh): see BENCHMARKS.md, sessions 29 and 38.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = pathlib.Path(os.environ.get("SAMI_JAX_SHARED", ROOT.parent / "shared"))
HH = SHARED / "data/hh-rlhf/harmless-base/test.jsonl.gz"

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def torch_sami_step(torch, model, opt, batches, autocast):
    """One SAMI update in PyTorch over micro-batches of (tokens, attention, loss_mask) [q, c, c, t]."""
    opt.zero_grad(set_to_none=True)
    losses = []
    for tokens, attention, loss_mask in batches:
        q, c, _, t = tokens.shape
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=tokens.reshape(-1, t), attention_mask=attention.reshape(-1, t)).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        lp = lp.gather(-1, tokens.reshape(-1, t)[:, 1:, None])[..., 0]
        mask = loss_mask.reshape(-1, t)[:, 1:].float()
        m = ((lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).reshape(q, c, c)
        target = torch.arange(c, device=m.device).expand(q, c)
        rows = torch.nn.functional.cross_entropy(m, target)
        cols = torch.nn.functional.cross_entropy(m.transpose(1, 2), target)
        loss = 0.5 * (rows + cols)
        (loss / len(batches)).backward()
        losses.append(loss.item())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(np.mean(losses))


def pairs(prompts, responses):
    """tokens [..., q, c, c, t]: pair (k, j) is prompts[..., q, k] followed by responses[..., q, j]."""
    *lead, c, p = prompts.shape
    r = responses.shape[-1]
    return np.concatenate([np.broadcast_to(prompts[..., :, None, :], (*lead, c, c, p)),
                           np.broadcast_to(responses[..., None, :, :], (*lead, c, c, r))], axis=-1)


def xla_option(text: str) -> tuple[str, bool | int | str]:
    """'xla_NAME=VALUE' -> (name, value) for `compile(compiler_options=)`: true/false as bools, digits as ints."""
    name, _, value = text.partition("=")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    return name, int(value) if value.lstrip("-").isdigit() else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("cpu", "gpu-1.1b"), default="cpu")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--rounds", type=int, help="rounds of --steps timed steps a side, in alternating order, both "
                        "sides kept in memory; the ratio is the median of the rounds' (default: 3 on cpu, 1 on "
                        "gpu-1.1b: the reference timed and freed first)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (ours: the first compiles)")
    parser.add_argument("--variants", help="ours as attention:remat[:option...], comma-separated; options: shared "
                        "(prompts shared), mN (N micro-batches instead of the setting's), bf16 (bfloat16 master "
                        "params), loop (the layers unrolled, `scan_layers=False`), xlaops (the weight products and "
                        "the attention on XLA's ops where the CPU kernels would take them, `cpu_kernels.training`), "
                        "xla_NAME=VALUE (an XLA option for this variant's compile alone). Default: "
                        "einsum:none and einsum:dots_no_batch:shared:m4 on cpu; einsum:dots_no_batch, "
                        "einsum:dots_no_batch:shared and cudnn:dots_no_batch on gpu-1.1b")
    parser.add_argument("--reference-micro", type=int, help="micro-batches of the reference instead of the "
                        "setting's (1 on cpu, 4 on gpu-1.1b)")
    parser.add_argument("--profile", metavar="DIR", help="profile one step of the last variant; table and HLO to DIR")
    parser.add_argument("--prompt-len", type=int, default=96, help="prompt tokens of each 256-token cpu pair")
    parser.add_argument("--smoke", action="store_true", help="gpu-1.1b shapes shrunk, to test the script on a CPU")
    parser.add_argument("--malloc", choices=("os", "keep"), default="os",
                        help="os (default): glibc's defaults, which map each large buffer anew and return it when "
                        "freed; keep: glibc serves every allocation from one heap and keeps what is freed (the "
                        "process re-runs itself with MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ and "
                        "MALLOC_ARENA_MAX=1 set; the heap only grows: one such run on the 24 GB VM was killed for "
                        "memory, and with --rounds, which keeps every side in memory, the two default cpu variants "
                        "peaked at 24.2 GB there (21.5 GB with os): time one variant at a time on such a machine)")
    args = parser.parse_args()
    if args.malloc == "keep" and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        # On the 2-core VM the reference's step took 1.2-1.8M page faults (its [16, 255, 49152] logits and their
        # log-softmax, mapped anew at every step) and 28-46 s of system time, which made it run at 90-112 tokens/s
        # instead of about 205 (BENCHMARKS.md, session 29). Ours took 0.44M a step (1.4 s of system time) until
        # one arena: glibc maps a request over 64 MB from a thread's own arena afresh whatever MALLOC_MMAP_MAX_
        # says, and XLA's worker threads allocate its temporaries (session 38).
        os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40), MALLOC_ARENA_MAX="1")
        os.execv(sys.executable, [sys.executable, *sys.argv])
    gpu = args.setting == "gpu-1.1b"
    if gpu:  # the torch reference runs first and frees its memory; jax then allocates what it needs
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    tmp = pathlib.Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)

    if gpu:
        shape = dict(TINYLLAMA)
        q, c, t, micro, prompt_len = 16, 2, 512, 4, 128
        if args.smoke:
            shape.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
            q, t, prompt_len = 4, 64, 16
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape), dtype=torch.float32)
        hf.save_pretrained(tmp / "model")
        source, label = tmp / "model", f"{'smoke' if args.smoke else '1.1B'} bf16 compute, {q * c * c} seq x {t}"
        shape_q = (micro, q // micro, c)
        tokens = pairs(rng.integers(3, shape["vocab_size"], (*shape_q, prompt_len)),
                       rng.integers(3, shape["vocab_size"], (*shape_q, t - prompt_len)))
    else:
        from sami_jax.demo import smollm2_gguf

        gguf = smollm2_gguf()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=torch.float32)
        source, label = gguf, f"SmolLM2-135M f32, 4 q x 2 x 2 x 256 tokens ({args.prompt_len} prompt)"
        q, c, t, micro, prompt_len = 4, 2, 256, 1, args.prompt_len
        from sami_jax.tokenizer import load_tokenizer

        tok = load_tokenizer(gguf)
        with gzip.open(HH, "rt") as f:
            ids = [tok.encode(json.loads(line)["chosen"]) for line in f]
        ids = np.asarray([x[:t] for x in ids if len(x) >= t][: q * c]).reshape(micro, q, c, t)
        tokens = pairs(ids[..., :prompt_len], ids[..., prompt_len:])
    attention = np.ones_like(tokens)
    loss_mask = np.zeros_like(tokens)
    loss_mask[..., prompt_len:] = 1
    lr = 1e-5

    # ---- reference: PyTorch + HF transformers
    hf = hf.to(device).train()
    hf.config.use_cache = False
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.01)
    ref_micro = args.reference_micro or micro
    batches = [tuple(torch.tensor(a.reshape(ref_micro, -1, *a.shape[2:])[i], device=device)
                     for a in (tokens, attention, loss_mask)) for i in range(ref_micro)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    ref_losses = [torch_sami_step(torch, hf, opt, batches, autocast=gpu) for _ in range(args.warmup)]
    sync()

    def time_reference():
        start = time.perf_counter()
        for _ in range(args.steps):
            torch_sami_step(torch, hf, opt, batches, autocast=gpu)
        sync()
        return (time.perf_counter() - start) / args.steps

    # One round: the reference alone, then each variant compiled, timed and freed in turn. More rounds: the reference
    # and every variant kept, and each round times them all, in alternating order; the ratios are per round.
    rounds = args.rounds or (1 if gpu else 3)
    ref_times = []
    if rounds == 1:
        ref_times.append(time_reference())
        del hf, opt, batches
        if device == "cuda":
            torch.cuda.empty_cache()

    # ---- ours
    import jax
    import jax.numpy as jnp

    import sami_jax
    from sami_jax.models.transformer import training_kernels
    from sami_jax.optim import OptimConfig
    from sami_jax.perf import peak_flops, train_flops
    from sami_jax.sami import init_train_state, prompt_window, response_window, sami_step

    model = sami_jax.load_model(source)
    config, params = model.config, model.params
    del model
    optim = OptimConfig(name="adamw", learning_rate=lr, weight_decay=0.01, clip_norm=1.0, schedule="constant")
    remat = "dots_no_batch" if gpu else "none"
    # cpu: the pairs as they come, and our fastest: prompts shared, one query per micro-batch (the same
    # update; smaller activations stay in cache) and the weight matmuls' outputs kept for the backward pass
    default = ("einsum:none,einsum:dots_no_batch:shared:m4" if not gpu else
               f"einsum:{remat},einsum:{remat}:shared" + (f",cudnn:{remat}" if device == "cuda" else ""))
    variants = [v.split(":") for v in (args.variants or default).split(",")]
    n_tokens = tokens.size
    peak = peak_flops(jax.devices()[0])
    flops = train_flops(config, n_tokens, t, logit_tokens=int(loss_mask.sum()))
    records = []
    kernels_env = {k: v for k, v in os.environ.items() if k == "SAMI_JAX_CPU_KERNELS"}
    print(f"reference: {ref_micro} micro-batches; malloc {args.malloc}; {rounds} round(s) of {args.steps} steps a side")
    print(f"{'setting':70s} {'ours tok/s':>11s} {'ref tok/s':>10s} {'ratio':>6s} {'ours MFU':>9s} {'ref MFU':>8s}")

    def prepare(impl, remat, *options):
        """A variant compiled and warmed up: dict(step, holder [state], arrays, setting, losses, ...), or None."""
        unknown = [o for o in options if o not in ("shared", "bf16", "loop", "xlaops") and o[:1] != "m"
                   and not o.startswith("xla_")]
        if unknown:
            raise SystemExit(f"unknown variant options {unknown}")
        xla = dict(xla_option(o) for o in options if o.startswith("xla_"))
        shared = "shared" in options
        n_micro = next((int(o[1:]) for o in options if o[:1] == "m"), micro)
        arrays = [jnp.asarray(a.reshape(n_micro, -1, *a.shape[2:])) for a in (tokens, attention, loss_mask)]
        kwargs = dict(config=config, optim=optim, compute_dtype=jnp.bfloat16 if gpu else None, remat=remat,
                      response_len=response_window(loss_mask), attention_impl=impl, prompts_shared=shared,
                      prompt_len=prompt_window(loss_mask) if shared else None, scan_layers="loop" not in options)
        # xlaops: the weight products and the attention on XLA's ops where the CPU kernels would take them
        os.environ.pop("SAMI_JAX_CPU_KERNELS", None)
        os.environ.update({"SAMI_JAX_CPU_KERNELS": "0"} if "xlaops" in options else kernels_env)
        jax.clear_caches()  # (training chooses its kernels when traced)
        on_kernels = not gpu and training_kernels(jnp.zeros(1))
        start_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params) if "bf16" in options else params
        state = init_train_state(start_params, optim)
        try:
            start = time.perf_counter()
            step = sami_step.lower(state, *arrays, **kwargs).compile(compiler_options=xla or None)
            state, metrics = step(state, *arrays)
            losses = [float(metrics["loss"])]
        except Exception as e:  # e.g. no cuDNN flash attention for this GPU / jax build: report, go on
            print(f"{':'.join([impl, remat, *options])}: failed: {type(e).__name__}: {str(e)[:300]}")
            return None
        compile_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            state, metrics = step(state, *arrays)
            losses.append(float(metrics["loss"]))
        setting = (f"{label}, attention {impl}, remat {remat}{', prompts shared' if shared else ''}, "
                   f"{n_micro} micro-batches{', bf16 master params' if 'bf16' in options else ''}"
                   f"{', layers unrolled' if 'loop' in options else ''}"
                   f"{', products and attention on the CPU kernels' if on_kernels else ''}"
                   + "".join(f", {k}={v}" for k, v in xla.items()))
        return dict(name=[impl, remat, *options], step=step, holder=[state], arrays=arrays, setting=setting,
                    losses=losses, compile_s=compile_s, times=[])

    def time_ours(run):
        step, holder, arrays = run["step"], run["holder"], run["arrays"]
        start = time.perf_counter()
        for _ in range(args.steps):
            holder[0], _ = step(holder[0], *arrays)
        jax.block_until_ready(holder[0])
        return (time.perf_counter() - start) / args.steps

    def finish(run):
        """Profile (the last variant, if asked), print and record a variant whose times are in."""
        if args.profile and run["name"] == variants[-1]:
            from benchmarks.op_profile import op_profile

            hlo = run["step"].as_text()

            def one_step(run=run):
                run["holder"][0], m = run["step"](run["holder"][0], *run["arrays"])
                jax.block_until_ready(m)

            op_profile(one_step, [hlo], top=40, title=f"sami_step, {':'.join(run['name'])}",
                       out_json=os.path.join(args.profile, "step_ops.json"))
            with gzip.open(os.path.join(args.profile, "step_hlo.txt.gz"), "wt") as f:
                f.write(hlo)
        run["holder"].clear()  # the state, before the next variant allocates its own
        ratios = [r / o for r, o in zip(ref_times, run["times"], strict=True)]
        ours_s, ref_s = float(np.median(run["times"])), float(np.median(ref_times))
        ratio = float(np.median(ratios))
        record = {"setting": run["setting"], "ours": n_tokens / ours_s, "reference": n_tokens / ref_s,
                  "unit": "tokens/s", "ratio": ratio, "round_ratios": ratios, "rounds": rounds, "steps": args.steps,
                  "step_seconds": {"ours": run["times"], "reference": ref_times},
                  "reference_micro_batches": ref_micro, "ours_compile_s": run["compile_s"],
                  "device": jax.devices()[0].device_kind,
                  "first_losses": {"ours": run["losses"], "reference": ref_losses}}
        if peak:
            record.update(ours_mfu=flops / ours_s / peak, reference_mfu=flops / ref_s / peak)
        mfu = f"{record['ours_mfu']:9.1%} {record['reference_mfu']:8.1%}" if peak else f"{'-':>9s} {'-':>8s}"
        print(f"{run['setting']:70s} {record['ours']:11.0f} {record['reference']:10.0f} {ratio:6.2f} {mfu}   "
              f"(our compile {run['compile_s']:.1f}s on {record['device']})")
        if rounds > 1:
            print(f"  per round: ratio {' '.join(f'{r:.3f}' for r in ratios)}; step seconds, ours "
                  f"{' '.join(f'{x:.2f}' for x in run['times'])}, reference {' '.join(f'{x:.2f}' for x in ref_times)}")
        print(f"  losses of the warm-up steps: ours {run['losses']}, reference {ref_losses}")
        records.append(record)
        if args.json:  # after each variant, so that a run cut short keeps what it measured
            pathlib.Path(args.json).write_text(json.dumps(records, indent=2))

    if rounds == 1:
        for variant in variants:
            run = prepare(*variant)
            if run is not None:
                run["times"].append(time_ours(run))
                finish(run)
    else:
        runs = [run for run in (prepare(*v) for v in variants) if run is not None]
        for r in range(rounds):
            sides = [None, *runs]  # None: the reference
            for side in sides if r % 2 == 0 else sides[::-1]:
                if side is None:
                    ref_times.append(time_reference())
                else:
                    side["times"].append(time_ours(side))
        for run in runs:
            finish(run)
    os.system(f"rm -rf {tmp}")


if __name__ == "__main__":
    main()

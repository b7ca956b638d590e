"""The real SmolLM2-135M-Instruct (GGUF, Q4_1) against transformers' own GGUF load, on real
HH-RLHF dialogues in one left-padded batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sami_jax
from sami_jax.models import cpu_kernels
from sami_jax.models.transformer import OutIn


def _weight_storage(sampler) -> set:
    """The dtypes of the sampler's projection weights: float32 panels, or uint8 8-bit blocks."""
    is_out_in = lambda w: isinstance(w, OutIn)
    return {w.w.dtype for w in jax.tree.leaves(sampler.run_params(), is_leaf=is_out_in) if is_out_in(w)}

N_TEXTS, MAX_TOKENS = 8, 96


def test_logits_match_transformers_gguf_load(smollm2_gguf, smollm2_transformers, hh_texts):
    model = sami_jax.load_model(smollm2_gguf)
    assert sami_jax.num_params(model.config) == 134_515_008
    # Real texts of mixed lengths (every 97th dialogue), cut to at most MAX_TOKENS tokens.
    rows = [model.tokenizer.encode(t)[:MAX_TOKENS] for t in hh_texts[::97][:N_TEXTS]]
    assert len(rows) == N_TEXTS and len({len(r) for r in rows}) > 1
    width = max(len(r) for r in rows)
    tokens = np.zeros((N_TEXTS, width), np.int32)
    mask = np.zeros((N_TEXTS, width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    ours = np.asarray(model.logits(tokens, mask))
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = smollm2_transformers(torch.tensor([r])).logits[0].numpy()
        mine = ours[i, width - len(r):]
        assert np.abs(mine - ref).max() <= 1e-3, i
        np.testing.assert_array_equal(mine.argmax(-1), ref.argmax(-1))


def test_convert_cli_to_hf_loads_in_transformers(smollm2_gguf, smollm2_transformers, tmp_path):
    """GGUF -> HF folder with our CLI; transformers loads the folder (weights and tokenizer) and
    computes the same logits as from the GGUF itself."""
    import transformers

    from sami_jax.convert import main

    assert main([f"--src={smollm2_gguf}", f"--dst={tmp_path}", "--format=hf"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok("Human: What is the capital of France?\n\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, smollm2_transformers(ids).logits, atol=1e-4, rtol=0)
    ours = sami_jax.load_model(tmp_path)
    assert ours.tokenizer.encode("Human: hi") == tok("Human: hi").input_ids


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return sami_jax.load_model(smollm2_gguf)


def _hh_prompts(hh_texts, n):
    """Real HH-RLHF queries (first human turn), as the paper's generation prompt ends: 'Assistant:'."""
    queries = [t.split("Human: ", 1)[1].split("\n\nAssistant:", 1)[0].strip() for t in hh_texts[::37][:n]]
    return [f"Human: {q}\n\nAssistant:" for q in queries]


def test_greedy_equals_hf_generate_on_real_prompts(smollm2, smollm2_transformers, hh_texts):
    """16 real prompts of mixed lengths in one left-padded batch, 64 new tokens, token for token."""
    from sami_jax.sampling import Sampler, SamplingParams

    prompts = _hh_prompts(hh_texts, 16)
    sampler = Sampler(smollm2)
    ours = sampler.generate(prompts, SamplingParams(max_new_tokens=64))
    if cpu_kernels.enabled():  # then every weight of this Q4_1/Q8_0 GGUF runs as 8-bit blocks
        assert _weight_storage(sampler) == {jnp.dtype(jnp.uint8)}
    tok = smollm2.tokenizer
    ids = [tok.encode(p) for p in prompts]
    assert len({len(i) for i in ids}) > 4
    width = max(len(i) for i in ids)
    batch = torch.tensor([[tok.pad_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        ref = smollm2_transformers.generate(batch, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                            eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id)[:, width:]
    for r, row in zip(ours, ref.tolist(), strict=True):
        expected = row[: row.index(tok.eos_ids[0])] if tok.eos_ids[0] in row else row
        assert r.token_ids == expected
        assert r.finish_reason == ("eos" if len(expected) < 64 else "length")
        assert r.text == tok.decode(expected)


def test_sampler_follows_new_params_from_blocks_to_float32_panels(smollm2, hh_texts):
    """SAMI's loop samples from the GGUF weights (8-bit blocks where the kernels run), then from trained ones,
    which have no quantized form (float32 panels): the same sampler recompiles for them and gives what a new
    sampler gives."""
    from sami_jax.sampling import Sampler, SamplingParams

    prompts, sp = _hh_prompts(hh_texts, 2), SamplingParams(max_new_tokens=8)
    sampler = Sampler(smollm2)
    sampler.generate(prompts, sp)
    if cpu_kernels.enabled():
        assert _weight_storage(sampler) == {jnp.dtype(jnp.uint8)}
    trained = jax.tree.map(lambda a: a * np.float32(1.001) if a.ndim > 1 else a, smollm2.params)
    sampler.params = trained
    got = sampler.generate(prompts, sp)
    if cpu_kernels.enabled():
        assert _weight_storage(sampler) == {jnp.dtype(jnp.float32)}
    fresh = Sampler(dataclasses.replace(smollm2, params=trained)).generate(prompts, sp)
    assert [g.token_ids for g in got] == [g.token_ids for g in fresh]


def test_stop_strings_cut_the_text(smollm2, hh_texts):
    from sami_jax.sampling import Sampler, SamplingParams

    prompts = _hh_prompts(hh_texts, 3)
    sampler = Sampler(smollm2)
    free = sampler.generate(prompts, SamplingParams(max_new_tokens=24))
    # A stop string taken from the middle of row 0's own answer; the other rows may or may not hit it.
    words = free[0].text.split()
    stop = " " + words[len(words) // 2]
    cut = sampler.generate(prompts, SamplingParams(max_new_tokens=24, stop=(stop, "###")))
    assert cut[0].finish_reason == "stop"
    assert cut[0].text == free[0].text[: free[0].text.index(stop)]
    assert stop in tok_text(smollm2, cut[0].token_ids) and stop not in tok_text(smollm2, cut[0].token_ids[:-1])
    for a, b in zip(cut, free, strict=True):
        assert b.text.startswith(a.text)
        assert a.finish_reason == ("stop" if stop in b.text or "###" in b.text else b.finish_reason)


def tok_text(model, ids):
    return model.tokenizer.decode(ids)


def test_generate_cli_with_chat_template(smollm2_gguf, tmp_path, capsys):
    import json

    import transformers

    from sami_jax.generate import main
    from sami_jax.tokenizer import apply_chat_template

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = sami_jax.load_model(smollm2_gguf).tokenizer.chat_template
    assert apply_chat_template(template, messages[0]["content"]) == expected

    # The chat task format (data.tasks.chat_task) renders what transformers renders for system + user.
    from sami_jax.data.tasks import CHAT_SYSTEM, chat_task, get_task

    constitution, query = "1. Be {brief}.\n2. Be kind.", "How do I {fix} a bike?"
    task = chat_task(get_task("hh"), template)
    expected = hf_tok.apply_chat_template(
        [{"role": "system", "content": CHAT_SYSTEM["hh"].format(constitution=constitution)},
         {"role": "user", "content": query}], tokenize=False, add_generation_prompt=True)
    assert task.generation_prompt(constitution, query) == task.training_prompt(constitution, query) == expected

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["What is the capital of France?", "Say hi."]))
    out = tmp_path / "out.jsonl"
    assert main([f"--model={smollm2_gguf}", f"--prompts={prompts}", f"--out={out}", "--chat",
                 "--max-new-tokens=12", "--batch-size=2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["What is the capital of France?", "Say hi."]
    assert "Paris" in records[0]["text"]
    assert all(set(r) == {"prompt", "text", "token_ids", "length", "finish_reason"} for r in records)
    assert all(r["length"] == len(r["token_ids"]) for r in records)

    prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(SystemExit):
        main([f"--model={smollm2_gguf}", f"--prompts={prompts}", f"--out={out}"])
    assert f"{prompts}:2" in capsys.readouterr().err

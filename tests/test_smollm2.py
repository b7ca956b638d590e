"""The real SmolLM2-135M-Instruct (GGUF, Q4_1) against transformers' own GGUF load, on real
HH-RLHF dialogues in one left-padded batch."""

import numpy as np
import torch

import sami_jax

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

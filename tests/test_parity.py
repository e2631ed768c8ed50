"""Our torch decoder against HF transformers on every trap checkpoint, both KV modes.

Prefill + 8 decode steps: logits within 1e-4; chosen-token log-probs within 1e-4; 32 greedy tokens identical to
HF `generate`. Extra checks that the trap actually bites (window shorter than the sequence, softcap exceeded).
"""

from __future__ import annotations

import json

import pytest
import torch

from export.model import load_model
from export.verify import compare, run_hf, run_ours
from tests.conftest import CASES
from tests.helpers import PROMPT


@pytest.mark.parametrize("kv_mode", ["concat", "static"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, kv_mode, checkpoints, hf_model):
    path = checkpoints(case)
    model, spec = load_model(path, kv_mode=kv_mode)
    ours = run_ours(model, PROMPT, steps=8)
    ref = run_hf(path, PROMPT, steps=8, hf_model=hf_model(path))
    r = compare(ours, ref)
    assert r["greedy_match"], (ours.tokens, ref.tokens)
    assert r["max_logit_diff"] < 1e-4, r
    assert r["max_logprob_diff"] < 1e-4, r
    assert len(ours.logits) == 9 and ours.logits[0].shape == (len(PROMPT), spec.vocab_size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_32_tokens_equal_hf_generate(case, checkpoints, hf_model):
    path = checkpoints(case)
    hf = hf_model(path)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    for kv_mode in ("concat", "static"):
        model, _ = load_model(path, kv_mode=kv_mode)
        ours = run_ours(model, PROMPT, steps=31)
        assert ours.tokens == expected, kv_mode


def test_traps_bite(checkpoints, hf_model):
    """The windows are shorter than the prompt and Gemma2's raw logits go well past the final cap."""
    for case in ("qwen2_window", "gemma2"):
        cfg = json.loads((checkpoints(case) / "config.json").read_text())
        assert cfg["sliding_window"] < len(PROMPT)
    path = checkpoints("gemma2")
    model, spec = load_model(path)
    with torch.no_grad():
        x = model.embed(torch.tensor([PROMPT])) * spec.embed_scale
        raw = model.lm_head(model.norm(x))  # the head without the cap, on the embedded prompt
    assert raw.abs().max() > 2 * spec.final_softcap


def test_window_changes_output(checkpoints):
    """Without the window, the same weights give different logits: the sliding layers really slide."""
    import dataclasses

    from export.model import Decoder

    for case in ("qwen2_window", "gemma2"):
        model, spec = load_model(checkpoints(case))
        full = Decoder(dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, window=None)
                                                              for l in spec.layers)), "concat", torch.float32, "all")
        full.load_state_dict(model.state_dict(), assign=True)
        a = run_ours(model, PROMPT, steps=0).logits[0]
        b = run_ours(full, PROMPT, steps=0).logits[0]
        assert (a[-1] - b[-1]).abs().max() > 1e-3, case
        assert (a[:5] - b[:5]).abs().max() < 1e-5, case  # before the window fills, nothing differs


def test_sharded_checkpoint_is_sharded(checkpoints):
    path = checkpoints("qwen2_sharded")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1


def test_verify_cli_json(checkpoints, capsys):
    from export.__main__ import main

    rc = main(["verify", "--model", str(checkpoints("gemma2")), "--steps", "4", "--json",
               "--prompt-ids", ",".join(map(str, PROMPT))])
    r = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert rc == 0
    assert r["greedy_match"] and r["max_logit_diff"] < 1e-4 and r["max_logprob_diff"] < 1e-4
    assert len(r["ours"]["tokens"]) == 5 == len(r["hf"]["logprobs"])
    assert r["ours"]["tokens"] == r["hf"]["tokens"]

"""benchmarks/peers/grid_inputs.py: the random-weight inputs of benchmarks/peer_trl_grid.py. The "eos"
policy draws EOS at the calibrated rate on sequences it was not calibrated on, the "fixed" one never
does, the two differ only in that one weight, and rlhf_fast reads the reward directory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import grid_inputs  # noqa: E402

T = 0.7


def _eos_and_pad_probs(model_dir: str, tok, seed: int) -> tuple[float, float]:
    """Mean probability of EOS and of pad at temperature T over the response positions of fresh
    random continuations (another seed than the calibration's)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([tok("the gentle horse passed")["input_ids"]] * 8),
                     torch.randint(2, model.config.vocab_size, (8, 12), generator=g)], 1)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[:, 3:-1].float() / T, -1)
    return float(p[..., tok.eos_token_id].mean()), float(p[..., tok.pad_token_id].max())


def test_grid_inputs_eos_rate_fixed_length_and_reward_dir(tmp_path):
    from safetensors.torch import load_file

    from rlhf_fast.models import RewardModel
    from rlhf_fast.tasks import get_task

    tok = get_task("tiny_sentiment").tokenizer
    info = grid_inputs.build(tmp_path / "g", layers=2, hidden=32, heads=2, mlp=64, vocab=len(tok) + 69, resp_len=12,
                             eos_mean=4.0, temperature=T)
    assert abs(info["calibration"]["p_eos_mean"] - 0.25) < 1e-4
    p_eos, p_pad = _eos_and_pad_probs(info["policy_dirs"]["eos"], tok, seed=7)
    assert 0.2 < p_eos < 0.3, p_eos  # the calibrated 1/4 on other continuations
    assert p_pad < 1e-30
    p_eos_fixed, p_pad_fixed = _eos_and_pad_probs(info["policy_dirs"]["fixed"], tok, seed=7)
    assert p_eos_fixed < 1e-30 and p_pad_fixed < 1e-30
    a = load_file(str(Path(info["policy_dirs"]["eos"]) / "model.safetensors"))
    b = load_file(str(Path(info["policy_dirs"]["fixed"]) / "model.safetensors"))
    diff = {k for k in a if not torch.equal(a[k], b[k])}
    assert diff == {"lm_head.weight"}
    changed = (a["lm_head.weight"] != b["lm_head.weight"]).nonzero().tolist()
    assert changed == [[tok.eos_token_id, 0]]
    rm = RewardModel.from_pretrained(info["reward_dir"]).eval()  # what rlhf_fast's ppo.reward.model_path loads
    ids = torch.tensor([tok("the gentle horse passed")["input_ids"]])
    assert torch.isfinite(rm(ids, torch.ones_like(ids)).scores).all()
    again = grid_inputs.build(tmp_path / "g", layers=2, hidden=32, heads=2, mlp=64, vocab=len(tok) + 69, resp_len=12,
                              eos_mean=4.0, temperature=T)
    assert again == info  # cached: same settings, same directory, nothing rebuilt

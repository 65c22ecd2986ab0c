"""Random-weight inputs of ``benchmarks/peer_trl_grid.py``: a Llama policy and reward model at a given
depth, width and vocabulary, built from configs (nothing downloaded or trained), with the built-in
task's tokenizer (631 tokens) and training prompts. Imported by peer_trl_grid.py only (this repository's
venv); never collected by pytest, never run in CI.

Response lengths without training. A random policy draws EOS with probability ~1/V per token, so "EOS
stopping" would be fixed length at every vocabulary. What matters for speed is the length distribution,
so the EOS logit is set, not learned:

- one residual coordinate ``d0`` holds a constant: every token embedding's coordinate d0 is ``C`` and
  no layer writes it (row d0 of every ``o_proj`` and ``down_proj`` is zero), so the last hidden state
  has h[d0] = C at every position, and after the final RMSNorm a positive, nearly constant C / rms(h);
- the lm_head row of EOS is ``a`` at d0 and zero elsewhere: the EOS logit is a * C / rms(h);
- "eos" policy: ``a`` found by bisection on the final hidden states of the task's prompts followed by
  uniformly random tokens (a random policy's samples are close to uniform), so that the mean per-token
  EOS probability at the sampling temperature is ``1 / eos_mean``: response lengths are then about
  geometric with mean ``eos_mean`` (cut at R); the record holds the lengths each trainer saw;
- "fixed" policy: the same weights with ``a`` large and negative: EOS is never drawn, every response
  runs to R (both trainers keep their EOS stopping on: the model decides, as a user's would).

In both the pad row is pushed down the same way (a trained policy never emits pad; TRL would read a
sampled pad token as the end of its response). The reward model (``LlamaForSequenceClassification``,
num_labels 1, its own random weights and score layer) is both sides' reward model and critic init.
Ids at or above the tokenizer's 631 are unused vocabulary, as the padded tail of Qwen2's 151,936 rows
(decoding skips them).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

RESIDUAL_CONST = 1.0  # C: about the rms of the other residual coordinates after a few random layers
NEVER = -1.0e4  # lm_head entry at d0 for a token that must never be drawn (logit ~ -1e4 * C / rms(h))


def llama_config(tok, *, layers: int, hidden: int, heads: int, mlp: int, vocab: int):
    from transformers import LlamaConfig

    if vocab < len(tok):
        raise ValueError(f"vocabulary {vocab} is smaller than the tokenizer's {len(tok)} tokens")
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=mlp, max_position_embeddings=256,
                       attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@torch.no_grad()
def _constant_coordinate(backbone, d0: int) -> None:
    """Residual coordinate ``d0`` = RESIDUAL_CONST at every position of every sequence (module docstring)."""
    backbone.embed_tokens.weight[:, d0] = RESIDUAL_CONST
    for layer in backbone.layers:
        layer.self_attn.o_proj.weight[d0, :] = 0.0
        layer.mlp.down_proj.weight[d0, :] = 0.0


@torch.no_grad()
def _calibration_states(model, tok, prompts: list[str], resp_len: int, seed: int) -> torch.Tensor:
    """Final (normed) hidden states, (N, H) float32, at the response positions of the first 16 prompts
    followed by ``resp_len`` uniformly random non-special tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = [tok(p)["input_ids"] for p in prompts[:16]]
    P = max(len(r) for r in rows)
    V = model.config.vocab_size
    ids = torch.full((len(rows), P + resp_len), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left-padded prompts, as both trainers generate
        ids[i, P - len(r):P] = torch.tensor(r)
        att[i, P - len(r):] = 1
    ids[:, P:] = torch.randint(2, V, (len(rows), resp_len), generator=g)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    h = model.model(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
    return h[:, P - 1:-1].reshape(-1, h.shape[-1]).float()  # the states that predict each response token


@torch.no_grad()
def calibrate_eos(model, states: torch.Tensor, eos: int, pad: int, d0: int, *, temperature: float,
                  eos_mean: float) -> dict:
    """Sets lm_head row ``eos`` to a * e_d0 with the mean EOS probability over ``states`` (N, H) at
    ``temperature`` equal to 1 / eos_mean (bisection; the probability grows with a)."""
    W = model.lm_head.weight
    W[pad] = 0.0
    W[pad, d0] = NEVER
    W[eos] = 0.0
    logits = (states @ W.T) / temperature  # (N, V); the EOS column is 0 here
    keep = torch.ones(logits.shape[1], dtype=torch.bool)
    keep[eos] = False
    lse_other = torch.logsumexp(logits[:, keep], dim=-1)  # (N,)
    x = states[:, d0] / temperature  # (N,) > 0: the EOS logit is a * x
    target = 1.0 / eos_mean

    def p_eos(a: float) -> float:
        return float(torch.sigmoid(a * x - lse_other).mean())

    lo, hi = 0.0, 1.0
    while p_eos(hi) < target:
        hi *= 2.0
        if hi > 1e6:
            raise RuntimeError("EOS calibration: no EOS weight reaches the target probability")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_eos(mid) < target else (lo, mid)
    a = 0.5 * (lo + hi)
    W[eos, d0] = a
    return {"eos_weight": a, "p_eos_mean": p_eos(a), "h_d0_min": float(states[:, d0].min()),
            "h_d0_max": float(states[:, d0].max())}


def build(directory: Path, *, layers: int, hidden: int, heads: int, mlp: int, vocab: int, resp_len: int,
          eos_mean: float, temperature: float, seed: int = 1) -> dict:
    """``directory``/{policy_eos, policy_fixed, reward_hf, prompts.jsonl, inputs.json}; returns (and caches)
    the inputs description. A directory whose inputs.json matches these settings is reused."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_fast.tasks import get_task

    settings = {"layers": layers, "hidden": hidden, "heads": heads, "mlp": mlp, "vocab": vocab, "resp_len": resp_len,
                "eos_mean": eos_mean, "temperature": temperature, "seed": seed, "format": 1}
    done = directory / "inputs.json"
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("settings") == settings:
            return info
    t0 = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    task = get_task("tiny_sentiment")
    tok = task.tokenizer
    prompts = [r["prompt"] for r in task.prompt_records("train")]
    with open(directory / "prompts.jsonl", "w") as f:
        f.write("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = llama_config(tok, layers=layers, hidden=hidden, heads=heads, mlp=mlp, vocab=vocab)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg).float().eval()
    d0 = 0
    _constant_coordinate(policy.model, d0)
    states = _calibration_states(policy, tok, prompts, resp_len, seed)
    cal = calibrate_eos(policy, states, tok.eos_token_id, tok.pad_token_id, d0, temperature=temperature,
                        eos_mean=eos_mean)
    policy.save_pretrained(directory / "policy_eos")
    tok.save_pretrained(directory / "policy_eos")
    with torch.no_grad():
        policy.lm_head.weight[tok.eos_token_id, d0] = NEVER
    policy.save_pretrained(directory / "policy_fixed")
    tok.save_pretrained(directory / "policy_fixed")
    rm_cfg = llama_config(tok, layers=layers, hidden=hidden, heads=heads, mlp=mlp, vocab=vocab)
    rm_cfg.num_labels = 1
    torch.manual_seed(seed + 1)
    rm = LlamaForSequenceClassification(rm_cfg).float()
    rm.save_pretrained(directory / "reward_hf")
    tok.save_pretrained(directory / "reward_hf")
    n_policy = sum(p.numel() for p in policy.parameters())
    n_rm = sum(p.numel() for p in rm.parameters())
    info = {"settings": settings, "dir": str(directory), "prompts": str(directory / "prompts.jsonl"),
            "policy_dirs": {"eos": str(directory / "policy_eos"), "fixed": str(directory / "policy_fixed")},
            "reward_dir": str(directory / "reward_hf"), "tokenizer_tokens": len(tok),
            "params": {"policy": n_policy, "reward": n_rm}, "calibration": cal,
            "expected_mean_length": round(sum((1 - 1 / eos_mean) ** k for k in range(resp_len)), 2),
            "build_s": round(time.perf_counter() - t0, 1)}
    if not math.isfinite(cal["eos_weight"]):
        raise RuntimeError(f"EOS calibration failed: {cal}")
    done.write_text(json.dumps(info, indent=1))
    return info

"""``HFGenerateBackend``: rollouts from Hugging Face ``generate`` on a copy of the policy's weights.

The second generation backend (issue 29), and the shape every backend that is not the hybrid
engine has, a vLLM or SGLang server included (docs/architecture.md, "Generation backends"):

- **its own weights**: a copy of the policy's causal LM, made once, and brought up to date by
  ``on_weights_updated`` (a parameter-by-parameter copy, counted in ``stats.weight_syncs`` /
  ``stats.weight_sync_bytes``): the trainer calls it after the optimizer steps of an iteration and
  after loading a checkpoint, so every rollout samples from the weights the trainer has then;
- **its own sampler and model code path**: ``transformers``' ``generate`` (its logits processors:
  min-new-tokens, temperature, top-k, top-p; ``torch.multinomial`` seeded from the call's seed), so
  its log-probs are not the trainer's numbers. ``logprobs_match_trainer`` is False: the trainer
  recomputes the old log-probs (``ppo.old_logprobs: recompute``) and logs the engine-vs-trainer gap
  (``generation/logprob_gap_max``).

The returned log-probs are of HF's processed scores (the distribution ``generate`` drew from); in
greedy mode ``generate`` applies no temperature or filter, so they are taken of the scores divided
by the temperature and filtered (``_filter.filter_logits``), as ``GenerationOutput`` promises.

Not supported (a ValueError says so): ZeRO-3 partitioned policies (the copy would be a full,
gathered one on every rank; use the hybrid engine, which gathers once per call).
"""

from __future__ import annotations

import copy

import torch

from rlhf_fast import _checks
from rlhf_fast._filter import filter_logits
from rlhf_fast.engine.generator import EngineStats, GenerationOutput
from rlhf_fast.engine.inference import unwrap, zero3_params
from rlhf_fast.engine.sampling import SamplingParams


class HFGenerateBackend:
    """A ``generator.Generator`` that keeps a copy of the policy's HF causal LM and samples with
    ``transformers.generate``.

    model: a HF causal LM, a ``rlhf_fast.models.Policy`` or a DeepSpeed engine (ZeRO 0-2) around
        either: its causal LM is copied (parameters and buffers) and later synced from it.
    pad_token_id: written after each row's stop token. max_batch_size: rows per ``generate`` call
        (a larger batch is generated in chunks). max_seq_len: prompt width + max_new_tokens must fit.
    """

    logprobs_match_trainer = False

    def __init__(self, model, *, pad_token_id: int, max_batch_size: int, max_seq_len: int):
        _checks.check_int("pad_token_id", pad_token_id, 0)
        _checks.check_int("max_batch_size", max_batch_size, 1)
        _checks.check_int("max_seq_len", max_seq_len, 2)
        self.module, self.lm, _ = unwrap(model)
        if zero3_params(self.module):
            raise ValueError("generation.backend 'hf_generate' keeps a full copy of the policy, but its parameters "
                             "are ZeRO-3 partitioned: use generation.backend 'hybrid' (it gathers them once per call)")
        self.pad_token_id, self.max_batch_size, self.max_seq_len = pad_token_id, max_batch_size, max_seq_len
        self.stats = EngineStats(decode="hf_generate")
        self.copy = copy.deepcopy(self.lm).eval().requires_grad_(False)
        self._pairs = self._matched_tensors()

    def _matched_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(source, copy) for every parameter and buffer, by name; a mismatch is a bug, named."""
        src = dict(self.lm.named_parameters()) | dict(self.lm.named_buffers())
        dst = dict(self.copy.named_parameters()) | dict(self.copy.named_buffers())
        if src.keys() != dst.keys():
            raise ValueError(f"the copy's tensors differ from the policy's: {sorted(src.keys() ^ dst.keys())[:4]}")
        return [(src[n], dst[n]) for n in src]

    def on_weights_updated(self) -> None:
        """Copies every parameter and buffer of the policy's causal LM into the backend's copy."""
        nbytes = 0
        with torch.no_grad():
            for s, d in self._pairs:
                d.copy_(s)
                nbytes += d.numel() * d.element_size()
        self.stats.weight_syncs += 1
        self.stats.weight_sync_bytes += nbytes

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams) -> GenerationOutput:
        """Responses for left-padded prompts ``input_ids`` / ``attention_mask`` (B, P)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        _checks.check_tensor("input_ids", input_ids, floating=False)
        _checks.check_tensor("attention_mask", attention_mask)
        if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape) or input_ids.numel() == 0:
            raise ValueError(f"input_ids and attention_mask must be the same non-empty (batch, prompt_len) shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        P = input_ids.shape[1]
        if P + params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt width {P} + max_new_tokens {params.max_new_tokens} exceeds max_seq_len "
                             f"{self.max_seq_len}")
        if not bool(attention_mask.bool()[:, -1].all()):
            raise ValueError("prompts must be left padded (attention_mask[:, -1] all ones)")
        # the call's seed: drawn from torch's global CPU generator when not given, as the hybrid engine does
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.stats.calls += 1
        outs = [self._chunk(input_ids[s : s + self.max_batch_size], attention_mask[s : s + self.max_batch_size],
                            params, seed + s) for s in range(0, input_ids.shape[0], self.max_batch_size)]
        R = max(t.shape[1] for t, _, _ in outs)
        pad = lambda x, v: torch.nn.functional.pad(x, (0, R - x.shape[1]), value=v)  # noqa: E731
        tokens = torch.cat([pad(t, self.pad_token_id) for t, _, _ in outs])
        valid = torch.cat([pad(v, False) for _, v, _ in outs])
        logps = torch.cat([pad(lp, 0.0) for _, _, lp in outs])
        return GenerationOutput(sequences=torch.cat([input_ids.long(), tokens], 1), response_mask=valid, logprobs=logps)

    def _chunk(self, ids, mask, params: SamplingParams, seed: int):
        """(tokens, valid, logps), each (b, R_chunk), of one ``generate`` call."""
        stop = params.stop_ids()
        kwargs = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens or None,
                      do_sample=params.do_sample, pad_token_id=self.pad_token_id,
                      eos_token_id=list(stop) if stop else None, output_scores=True, return_dict_in_generate=True)
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
        devices = [ids.device] if ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = self.copy.generate(input_ids=ids, attention_mask=mask.long(), **kwargs)
        self.stats.forwards += len(out.scores)
        tokens = out.sequences[:, ids.shape[1]:]  # (b, R)
        logps = torch.stack([_step_logprob(sc, tokens[:, t], params) for t, sc in enumerate(out.scores)], 1)  # (b, R)
        valid = _valid_through_first_stop(tokens, stop)
        return tokens.masked_fill(~valid, self.pad_token_id), valid, torch.where(valid, logps, 0.0)


def _step_logprob(scores: torch.Tensor, token: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(b,) log-prob of ``token`` under one step's processed scores (b, V), the distribution HF drew
    it from; in greedy mode ``generate`` applied no temperature or filter, so they are applied here
    (the ``GenerationOutput`` contract). One step at a time: never a (b, R, V) float copy, which at
    V = 151,936 would be gigabytes beside the R x (b, V) scores ``generate`` already returns."""
    z = scores.float()
    if not params.do_sample:
        z = filter_logits(z / params.temperature, params.top_k, params.top_p)
    return torch.log_softmax(z, -1).gather(-1, token.unsqueeze(-1)).squeeze(-1)


def _valid_through_first_stop(tokens: torch.Tensor, stop: tuple[int, ...]) -> torch.Tensor:
    """(b, R) bool: every token up to and including a row's first stop token (all, with none)."""
    if not stop:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_stop = torch.isin(tokens, torch.tensor(stop, device=tokens.device))
    before = torch.cumsum(is_stop.long(), 1) - is_stop.long()  # stop tokens strictly before each position
    return before == 0


def build(model, *, pad_token_id: int, max_batch_size: int, max_seq_len: int, decode: str = "auto",
          **hybrid_only: object) -> HFGenerateBackend:
    """The registry's builder: ``decode`` and the hybrid engine's tuning knobs do not apply."""
    if decode != "auto":
        raise ValueError(f"generation.decode {decode!r} selects a decode path of the hybrid engine; "
                         "generation.backend 'hf_generate' has none (leave decode 'auto')")
    if hybrid_only:
        raise ValueError(f"{sorted(hybrid_only)} tune the hybrid engine's decode loop; generation.backend "
                         "'hf_generate' has none")
    return HFGenerateBackend(model, pad_token_id=pad_token_id, max_batch_size=max_batch_size, max_seq_len=max_seq_len)

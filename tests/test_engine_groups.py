"""Group sampling's shared prefill (``engine/prefix_share.py``, ``engine/eager.py``): runs of
identical consecutive prompts (``samples_per_prompt`` copies) go through one prefill forward,
and every row still draws exactly the tokens it draws when each row is prefilled on its own (the
uniforms are keyed by (seed, step, row in the call)); the counters show the saved rows."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.engine import HybridEngine, SamplingParams
from rlhf_fast.engine import prefix_share

from test_engine import PAD, _model, _prompts


def _groups(k: int, B: int = 5, P: int = 7):
    ids, mask = _prompts(B=B, P=P)
    return ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)


def test_plan_runs_of_identical_rows():
    ids, mask = _groups(3, B=4)
    plan = prefix_share.plan(ids, mask)
    assert plan.first.tolist() == [0, 3, 6, 9] and plan.expand.tolist() == [i // 3 for i in range(12)]
    assert plan.saved_rows == 8
    distinct, dmask = _prompts(B=4)
    assert prefix_share.plan(distinct, dmask) is None  # nothing to share
    # the same ids with a different mask are different prompts
    m2 = mask.clone()
    m2[1, -1] = 1 - m2[1, -1]
    assert prefix_share.plan(ids, m2).first.tolist() == [0, 1, 2, 3, 6, 9]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("eos", [None, 5])
def test_shared_prefill_is_token_identical(arch, eos):
    torch.manual_seed(0)
    model = _model(arch)
    ids, mask = _groups(4)
    kw = dict(pad_token_id=PAD, max_batch_size=32, max_seq_len=ids.shape[1] + 12, decode="eager")
    shared, alone = HybridEngine(model, **kw), HybridEngine(model, share_prefill=False, **kw)
    p = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.0, eos_token_id=eos, seed=11)
    a, b = shared.generate(ids, mask, p), alone.generate(ids, mask, p)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
    assert shared.stats.prefill_rows == 5 and shared.stats.prefill_rows_shared == 15
    assert alone.stats.prefill_rows == 20 and alone.stats.prefill_rows_shared == 0
    # the rows of a group still differ from each other (their draws are keyed by row)
    assert not all(torch.equal(a.sequences[0], a.sequences[j]) for j in range(1, 4))


def test_shared_prefill_across_chunks():
    """max_batch_size cuts a group in two: each chunk shares what it holds, tokens unchanged."""
    model = _model("llama")
    ids, mask = _groups(3, B=4)  # 12 rows, chunks of 5
    kw = dict(pad_token_id=PAD, max_batch_size=5, max_seq_len=ids.shape[1] + 6, decode="eager")
    p = SamplingParams(max_new_tokens=6, seed=2)
    a = HybridEngine(model, **kw).generate(ids, mask, p)
    b = HybridEngine(model, share_prefill=False, **kw).generate(ids, mask, p)
    assert torch.equal(a.sequences, b.sequences)

"""Worker for tests/test_engine_zero3.py, launched as ``torchrun --nproc_per_node 2`` (gloo, CPU).

ZeRO-3 (every parameter partitioned: persistence threshold 0) around a Policy: greedy rollouts
equal the plain (ZeRO-0) model's, the parameters are gathered once per generate and ZeRO's
per-module fetch never runs during it, and a training step afterwards works (finite loss,
parameters changed) and the next rollout equals a plain model loaded with the updated weights.
Writes a JSON summary to argv[1] on rank 0 and exits non-zero on any failure.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator  # noqa: E402

from rlhf_fast.engine import HybridEngine, SamplingParams  # noqa: E402
from rlhf_fast.models import Policy, load_causal_lm, position_ids_from_mask  # noqa: E402
from rlhf_fast.tasks import tiny_config  # noqa: E402

PAD, V, EOS = 0, 97, None


def prompts(B=8, P=9):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (B, P), generator=g)
    lengths = torch.randint(2, P + 1, (B,), generator=g)
    lengths[0] = P
    mask = (torch.arange(P)[None, :] >= (P - lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


COUNTS = {"fetch": 0, "gather_enter": 0}
_fetch = PartitionedParameterCoordinator.fetch_sub_module
_enter = deepspeed.zero.GatheredParameters.__enter__


def counting_fetch(self, *a, **k):
    COUNTS["fetch"] += 1
    return _fetch(self, *a, **k)


def counting_enter(self, *a, **k):
    COUNTS["gather_enter"] += 1
    return _enter(self, *a, **k)


PartitionedParameterCoordinator.fetch_sub_module = counting_fetch
deepspeed.zero.GatheredParameters.__enter__ = counting_enter


def full_state(module):
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main(out_path):
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = tiny_config("llama", vocab_size=V, size="test", initializer_range=0.3)
    ids, mask = prompts()
    greedy = SamplingParams(max_new_tokens=16, do_sample=False, eos_token_id=7)
    sampled = SamplingParams(max_new_tokens=16, seed=5, temperature=0.9, top_k=20, eos_token_id=7)

    plain = Policy(load_causal_lm(cfg, seed=1), value_head=True)
    plain_engine = HybridEngine(plain, pad_token_id=PAD, max_batch_size=8, max_seq_len=32)
    ref_greedy = plain_engine.generate(ids, mask, greedy)
    ref_sampled = plain_engine.generate(ids, mask, sampled)

    policy = Policy(load_causal_lm(cfg, seed=1), value_head=True)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    opt = torch.optim.SGD(policy.parameters(), lr=20.0)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, config=ds_config)
    partitioned = [p for p in engine.module.parameters() if p.ds_numel != p.numel()]
    assert len(partitioned) == len(list(engine.module.parameters())), "every parameter should be partitioned"

    hybrid = HybridEngine(engine, pad_token_id=PAD, max_batch_size=8, max_seq_len=32)
    COUNTS.update(fetch=0, gather_enter=0)
    out_greedy = hybrid.generate(ids, mask, greedy)
    fetch_during, enters_during, gathers = COUNTS["fetch"], COUNTS["gather_enter"], hybrid.stats.gathers
    out_sampled = hybrid.generate(ids, mask, sampled)
    summary = {
        "greedy_equal": bool(torch.equal(out_greedy.sequences, ref_greedy.sequences)),
        "sampled_equal": bool(torch.equal(out_sampled.sequences, ref_sampled.sequences)),
        "sampled_lp_diff": float((out_sampled.logprobs - ref_sampled.logprobs).abs().max()),
        "lengths": out_greedy.response_mask.sum(1).tolist(),
        "fetches_during_generate": fetch_during,
        "gather_enters_per_generate": enters_during,
        "engine_gathers": gathers,
        "generate_calls": hybrid.stats.calls,
        "decode_forwards": hybrid.stats.forwards,
        "params_still_partitioned": all(p.numel() == 0 or p.ds_status.name == "NOT_AVAILABLE"
                                        for p in engine.module.parameters()),
    }

    # training continues: one step on the rollout's log-probs through the DeepSpeed engine
    before = full_state(engine.module)
    engine.train()
    full_mask = torch.cat([mask.bool(), out_greedy.response_mask], 1).long()
    COUNTS["fetch"] = 0
    hidden = engine(out_greedy.sequences, full_mask).hidden
    logits = engine.module.lm_head(hidden[:, ids.shape[1] - 1 : -1]).float()
    lp = torch.log_softmax(logits, -1).gather(-1, out_greedy.responses[..., None]).squeeze(-1)
    loss = (lp * out_greedy.response_mask).sum() / out_greedy.response_mask.sum()
    engine.backward(loss)
    engine.step()
    summary["fetches_in_training_forward"] = COUNTS["fetch"]
    summary["loss"] = float(loss)
    after = full_state(engine.module)
    summary["max_param_change"] = max(float((after[k] - before[k]).abs().max()) for k in before)

    # the next rollout uses the new weights: equal to a plain model loaded with them
    plain.load_state_dict(after)
    ref_after = plain_engine.generate(ids, mask, greedy)
    out_after = hybrid.generate(ids, mask, greedy)
    summary["after_step_equal"] = bool(torch.equal(out_after.sequences, ref_after.sequences))
    summary["after_step_changed"] = not torch.equal(out_after.sequences, out_greedy.sequences)
    summary["engine_gathers_total"] = hybrid.stats.gathers
    summary["module_training_after"] = engine.module.training

    ok = (
        summary["greedy_equal"] and summary["sampled_equal"] and summary["sampled_lp_diff"] <= 1e-5
        and summary["fetches_during_generate"] == 0 and summary["gather_enters_per_generate"] == 1
        and summary["engine_gathers"] == 1 and summary["params_still_partitioned"]
        and summary["fetches_in_training_forward"] > 0 and torch.isfinite(torch.tensor(summary["loss"]))
        and summary["max_param_change"] > 0 and summary["after_step_equal"] and summary["after_step_changed"]
        and summary["engine_gathers_total"] == 3 and summary["module_training_after"]
    )
    summary["ok"] = bool(ok)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"rank {rank}: {json.dumps(summary)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1])

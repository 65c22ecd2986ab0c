"""LoRA through peft (docs/architecture.md "LoRA"): default targets per architecture and the error
for a module the model lacks; the save layout (peft adapter, base/, merged/) and loading a LoRA
directory as a merged model; the stages end to end on the built-in task's test-size model:
SFT with adapters -> a reward model with adapters from it -> PPO with adapters from both, the
policy's reference holding no weights of its own, the engine / trainer log-prob gap 0 with
adapters and fused linear log-probs, only adapters and heads moving, and ``--resume``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_fast import config as C
from rlhf_fast.config import LoRAConfig
from rlhf_fast.models import Critic, Policy, RewardModel, lora
from rlhf_fast.tasks import tiny_config
from rlhf_fast.trainers.ppo import PPOTrainer
from rlhf_fast.trainers.rm import RMTrainer
from rlhf_fast.trainers.run.metrics_log import read_metrics
from rlhf_fast.trainers.sft import SFTTrainer

V = 48
ARCHS = {"gpt2": ["c_attn", "c_fc", "c_proj"], "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                         "up_proj", "v_proj"],
         "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
         "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]}


def _policy(arch="gpt2", **kw):
    cfg = tiny_config(arch, vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Policy.from_pretrained(cfg, seed=0, **kw)


def _ids(B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


def _randomize_adapters(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---- targets and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_default_targets_are_every_block_linear(arch):
    policy = _policy(arch)
    lora.add_lora(policy.model, LoRAConfig(rank=4), field="ppo.lora")
    adapted = sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in policy.named_parameters() if ".lora_A." in n})
    assert adapted == ARCHS[arch]
    assert sorted(lora.DEFAULT_TARGET_MODULES[policy.config.model_type]) == ARCHS[arch]
    trainable = lora.trainable_parameter_names(policy)
    assert trainable and all("lora_" in n for n in trainable)  # the base (embeddings, LM head, norms) is frozen


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_module_the_architecture_lacks_names_the_field_and_the_modules(arch):
    policy = _policy(arch)
    wrong = "q_proj" if arch in ("gpt2", "gpt_neox") else "c_attn"
    with pytest.raises(ValueError) as e:
        lora.add_lora(policy.model, LoRAConfig(rank=4, target_modules=[wrong]), field="sft.lora")
    msg = str(e.value)
    assert msg.startswith("sft.lora.target_modules:") and wrong in msg
    assert all(name in msg for name in ARCHS[arch])


def test_config_errors():
    with pytest.raises(ValueError, match=r"ppo\.lora\.rank: expected an integer >= 0"):
        C.load_config(overrides=["--ppo.lora.rank", "-1"])
    with pytest.raises(ValueError, match=r"ppo\.ref_on_cpu has nothing to move with ppo\.lora\.rank 8"):
        C.load_config(overrides=["--ppo.lora.rank", "8", "--ppo.ref_on_cpu", "true"])
    with pytest.raises(ValueError, match=r"ppo\.lora\.dropout must be 0 in PPO"):
        C.load_config(overrides=["--ppo.lora.rank", "8", "--ppo.lora.dropout", "0.1"])
    cfg = C.load_config(overrides=["--rm.lora.rank", "8", "--rm.lora.dropout", "0.1",
                                   "--sft.lora.target_modules", "c_attn,c_fc"])
    assert cfg.rm.lora.dropout == 0.1 and cfg.sft.lora.target_modules == ["c_attn", "c_fc"]


# ---- save / load ------------------------------------------------------------------------------------


def test_adapters_off_is_the_base_and_shares_its_weights():
    base = _policy(value_head=True)
    ids, mask = _ids()
    want = base.logprobs(ids, mask).logprobs
    policy = _policy(value_head=True)
    lora.add_lora(policy.model, LoRAConfig(rank=4), field="ppo.lora")
    assert torch.equal(policy.logprobs(ids, mask).logprobs, want)  # B = 0 at init
    _randomize_adapters(policy)
    ref = lora.AdaptersOff(policy)
    assert not torch.equal(policy.logprobs(ids, mask).logprobs, want)
    assert torch.equal(ref.logprobs(ids, mask).logprobs, want)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)  # re-enabled after
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert {p.data_ptr() for p in ref.parameters()} <= policy_ptrs
    with pytest.raises(ValueError, match="needs a policy with LoRA adapters"):
        lora.AdaptersOff(base)


def test_save_layout_and_loading(tmp_path):
    policy = _policy(value_head=True)
    lora.add_lora(policy.model, LoRAConfig(rank=4), field="ppo.lora")
    _randomize_adapters(policy)
    with torch.no_grad():
        policy.value_head.linear.bias.fill_(0.25)
    ids, mask = _ids()
    want = policy.logprobs(ids, mask)
    lora.save_model(policy, tmp_path / "m", merged=True)
    d = tmp_path / "m"
    assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    assert not (d / "config.json").exists() and (d / "base" / "config.json").is_file()
    meta = json.loads((d / "rlhf_fast.json").read_text())
    assert meta["kind"] == "policy" and meta["lora"]["rank"] == 4 and meta["lora"]["over"] == "causal_lm"
    # peft reads the adapter onto the base by itself
    from peft import PeftModel

    base_lm = AutoModelForCausalLM.from_pretrained(d / "base", local_files_only=True)
    peft_lm = PeftModel.from_pretrained(base_lm, str(d))
    logits = peft_lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - mask).clamp(min=0)).logits
    torch.testing.assert_close(logits, policy.logits(ids, mask), rtol=1e-5, atol=1e-5)
    # rlhf_fast loads the directory merged, value head included; merged/ is a plain HF model; base/ the base
    for path in (d, d / "merged"):
        got = Policy.from_pretrained(path)
        assert not lora.has_lora(got)
        torch.testing.assert_close(got.logprobs(ids, mask).logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logprobs(ids, mask).values, want.values)
    plain = AutoModelForCausalLM.from_pretrained(d / "merged", local_files_only=True)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    base_again = Policy.from_pretrained(d / "base")
    assert torch.equal(base_again.logprobs(ids, mask).logprobs, _policy().logprobs(ids, mask).logprobs)
    # a LoRA policy feeds a reward model / critic (backbone merged; a policy holds no trained reward
    # head, so the reward model asks for a new one, as RM training does)
    rm = RewardModel.from_pretrained(d, new_head=True)
    m = mask.bool()  # padded positions differ on purpose: the reward model reads id 0 there (models/reward.py)
    torch.testing.assert_close(rm(ids, mask).hidden[m], policy(ids, mask).hidden[m], rtol=1e-5, atol=1e-5)


def test_lora_reward_model_round_trip(tmp_path):
    rm = RewardModel(_policy().backbone, seed=3)
    lora.add_lora(rm.backbone, LoRAConfig(rank=2), field="rm.lora")
    _randomize_adapters(rm)
    rm.set_reference_normalization(torch.tensor([1.0, 2.0]))
    ids, mask = _ids()
    want = rm(ids, mask)
    lora.save_model(rm, tmp_path / "rm")
    back = RewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(back(ids, mask).scores, want.scores, rtol=1e-5, atol=1e-5)
    assert back.normalization["mode"] == "reference_mean"
    critic = Critic.from_pretrained(tmp_path / "rm")  # the critic starts from a LoRA reward model
    torch.testing.assert_close(critic(ids, mask).values, want.rewards, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="saved as a .reward_model., not a policy|adapted over a backbone has no LM head"):
        Policy.from_pretrained(tmp_path / "rm")


# ---- the stages -------------------------------------------------------------------------------------

QUIET = [f"--{s}.logging.{k}" for s in ("sft", "rm", "ppo") for k in ("progress_bar", "tensorboard")]
QUIET = [x for k in QUIET for x in (k, "false")]
SFT = ["--sft.model.size", "test", "--sft.model.config_overrides", "{}", "--sft.batch_size", "16",
       "--sft.micro_batch_size", "8", "--sft.data.max_train_examples", "200", "--sft.data.max_eval_examples", "16",
       "--sft.eval_batch_size", "16", "--sft.max_steps", "4", "--sft.logging.log_every", "1",
       "--sft.logging.save_every", "2", "--sft.lora.rank", "4", "--sft.optim.lr", "1e-2"]
RM = ["--rm.batch_size", "16", "--rm.micro_batch_size", "8", "--rm.data.max_train_examples", "64",
      "--rm.data.max_eval_examples", "16", "--rm.max_steps", "2", "--rm.normalization", "reference_mean",
      "--rm.normalization_samples", "16", "--rm.lora.rank", "4", "--sft.data.max_train_examples", "200"]
PPO = ["--ppo.iterations", "2", "--ppo.rollout_batch_size", "8", "--ppo.generation.max_new_tokens", "6",
       "--ppo.eval_prompts", "8", "--ppo.logging.eval_every", "0", "--ppo.algo.num_minibatches", "2",
       "--ppo.algo.num_epochs", "2", "--ppo.optim.lr", "1e-2", "--ppo.lora.rank", "4"]


def _cfg(*extra):
    return C.load_config(overrides=[*QUIET, *SFT, *RM, *PPO, *extra])


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in rows]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    SFTTrainer(_cfg().sft, out).fit()
    return out


def test_sft_trains_only_adapters_and_resumes(sft_dir, tmp_path):
    model = sft_dir / "model"
    assert lora.is_adapter_dir(model) and (model / "tokenizer.json").is_file()
    rows = read_metrics(sft_dir)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    # the base in model/base is the untouched initial model (fresh config, init_seed 0, resized)
    t = SFTTrainer(_cfg().sft, tmp_path / "unused")
    t.build_datasets()
    init = t.build_model()
    saved = AutoModelForCausalLM.from_pretrained(model / "base", local_files_only=True).state_dict()
    for k, v in lora._plain_state_dict(init, merged=False).items():
        assert torch.equal(saved[k], v), k
    # --resume: stopped after step 3 (checkpoint at 2), then resumed: the same metrics
    part = tmp_path / "part"
    SFTTrainer(_cfg("--sft.stop_after_steps", "3").sft, part).fit()
    SFTTrainer(_cfg().sft, part, resume=True).fit()
    assert _comparable(read_metrics(part)) == _comparable(rows)


@pytest.fixture(scope="module")
def rm_dir(sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    cfg = _cfg("--rm.sft_model", str(sft_dir / "model"))
    RMTrainer(cfg.rm, out, reference_data=cfg.sft.data).fit()
    return out


def test_reward_model_from_a_lora_sft_model(sft_dir, rm_dir):
    model = rm_dir / "model"
    assert lora.is_adapter_dir(model)
    meta = json.loads((model / "rlhf_fast.json").read_text())
    assert meta["kind"] == "reward_model" and meta["lora"]["over"] == "backbone"
    # its base is the SFT model merged: the RM's frozen backbone weights are the SFT policy's
    sft = Policy.from_pretrained(sft_dir / "model").backbone.state_dict()
    base = RewardModel.from_pretrained(model / "base").backbone.state_dict()
    assert sft.keys() == base.keys() and all(torch.equal(sft[k], base[k]) for k in sft)
    head = RewardModel.from_pretrained(model).head.linear.weight
    assert not torch.equal(head, RewardModel(Policy.from_pretrained(sft_dir / "model").backbone,
                                             seed=0).head.linear.weight)  # the head trained fully


@pytest.fixture(scope="module")
def ppo_run(sft_dir, rm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    cfg = _cfg("--ppo.policy.path", str(sft_dir / "model"), "--ppo.reward.model_path", str(rm_dir / "model"),
               "--ppo.critic", "separate", "--ppo.critic_lora.rank", "2", "--ppo.use_linear_logprobs", "true").ppo
    trainer = PPOTrainer(cfg, out)
    trainer.fit()
    return out, trainer, cfg


def test_ppo_reference_is_the_policy_with_adapters_off(ppo_run):
    out, trainer, _ = ppo_run
    policy = trainer.policy_engine.module
    assert isinstance(trainer.ref_policy, lora.AdaptersOff) and trainer.ref_policy.policy is policy
    assert trainer.frozen_engines == []
    # no reference copy: the parameter storages of policy + reference are the policy's alone
    own = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    both = own | {p.untyped_storage().data_ptr() for p in trainer.ref_policy.parameters()}
    assert both == own and len(list(trainer.ref_policy.parameters())) > 0
    # the engine generates through the adapted module itself (no merged copy)
    assert trainer.gen.lm is policy.model and lora.has_lora(trainer.gen.lm)
    critic = trainer.critic_engine.module
    assert lora.has_lora(critic) and all(("lora_" in n) or n.startswith("value_head.")
                                         for n in lora.trainable_parameter_names(critic))


def test_ppo_with_adapters_metrics(ppo_run):
    out, _, _ = ppo_run
    train = [r for r in read_metrics(out) if "objective/kl" in r]
    assert len(train) == 2
    assert train[0]["objective/kl"] == 0.0  # B = 0: the adapted policy is exactly its reference
    assert train[1]["objective/kl"] != 0.0  # the adapters moved
    # the engine samples through the adapted layers (no merge, no copy): same log-probs as the trainer
    assert all(r["generation/logprob_gap_max"] < 1e-4 for r in train)


def test_ppo_saves_adapter_over_the_merged_sft_policy(ppo_run, sft_dir):
    out, _, _ = ppo_run
    model = out / "model"
    assert lora.is_adapter_dir(model)
    sft = Policy.from_pretrained(sft_dir / "model").state_dict()
    base = Policy.from_pretrained(model / "base").state_dict()
    assert all(torch.equal(sft[k], base[k]) for k in sft)  # only the adapters moved
    final = Policy.from_pretrained(model).state_dict()
    assert any(not torch.equal(sft[k], final[k]) for k in sft)


def test_ppo_resume_with_adapters(ppo_run, tmp_path):
    import copy

    out, _, cfg = ppo_run
    part = copy.deepcopy(cfg)
    part.stop_after_iterations = 1
    PPOTrainer(part, tmp_path).fit()
    PPOTrainer(cfg, tmp_path, resume=True).fit()
    assert _comparable(read_metrics(tmp_path)) == _comparable(read_metrics(out))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_engine_decodes_through_the_adapters(arch):
    """The hybrid engine's eager and static (the compiled path's step) decoders run the adapted
    layers as they are: the same tokens on both, log-probs equal to the policy's own forward, and
    different from the base model's (the adapters are in the loop, nothing was merged)."""
    from rlhf_fast.engine import SamplingParams, make_generator

    policy = _policy(arch)
    lora.add_lora(policy.model, LoRAConfig(rank=4), field="ppo.lora")
    _randomize_adapters(policy)
    before = {n: p.clone() for n, p in policy.named_parameters()}
    ids, mask = _ids(B=4, T=5)
    params = SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.7, seed=3)
    outs = {d: make_generator(policy, pad_token_id=0, max_batch_size=4, max_seq_len=11, decode=d).generate(
        ids, mask.bool(), params) for d in ("eager", "static")}
    assert torch.equal(outs["eager"].sequences, outs["static"].sequences)
    out = outs["eager"]
    full_mask = torch.cat([mask.bool(), out.response_mask], 1)
    kw = dict(temperature=0.7, response_start=ids.shape[1])
    mine = policy.logprobs(out.sequences, full_mask, **kw).logprobs
    gap = torch.where(out.response_mask, (mine - out.logprobs).abs(), 0.0).max()
    assert float(gap) < 1e-4
    base = lora.AdaptersOff(policy).logprobs(out.sequences, full_mask, **kw).logprobs
    assert float(torch.where(out.response_mask, (base - out.logprobs).abs(), 0.0).max()) > 1e-3
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # no merge into the weights

"""Reward-model training: Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)`` on
the score at the last valid token (the EOS; N details #7, N+), accuracy, then the normalisation of
``RewardModel`` (N details #9 on policy samples, or N+'s reference mean). With
``normalize_before`` the policy-sample normalisation is also set before training and the loss
reads the normalised scores (N details #9, as lm-human-preferences' ``normalize_before``).

Each forward scores 2B sequences (chosen rows first, rejected rows after: ``PreferenceCollator``).
The loss is the mean over the pairs of the global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from rlhf_fast.config import DataConfig, GenerationConfig, RMConfig, validate
from rlhf_fast.data import PreferenceDataset, left_pad
from rlhf_fast.models import RewardModel, load_causal_lm, lora, resize_embeddings_for_tokenizer
from rlhf_fast.models.hf_classifier import describe_model_dir, holds_reward_model
from rlhf_fast.models.packing import set_packing
from rlhf_fast.models.reward import RM_NORMALIZATIONS
from rlhf_fast.trainers import _build
from rlhf_fast.trainers.stage_loop import DatasetStageTrainer
from rlhf_fast.trainers.deepspeed_setup import DistInfo


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-pair ``-log sigmoid(chosen - rejected - margin)`` (float32, shape of the inputs)."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


def _field(record, name: str) -> str:
    return record.text(name) if hasattr(record, "text") else record[name]


class RMTrainer(DatasetStageTrainer):
    """``RMTrainer(cfg.rm, "out/rm").fit()`` writes ``out/rm/model`` (a ``RewardModel`` with its
    normalisation, and the tokenizer) and returns the last logged metrics (``eval/accuracy``,
    ``eval/loss``, ``norm/*``...); with ``normalize_before``, ``norm_before/*`` is logged at step 0.

    The backbone comes from ``cfg.sft_model`` (N+: the RM starts from the SFT model), else
    ``cfg.model.path``, else a fresh ``cfg.model`` config; a source without a reward head gets a
    fresh one, a reward model (ours or an HF sequence classifier) keeps its trained head. Data:
    ``cfg.data.train_file`` (text ``prompt`` / ``chosen`` / ``rejected`` records or TRL's chat
    preference format, ``rlhf_fast.data.chat``) or the built-in task; every record is checked in
    the constructor, before distributed set-up. ``reference_data``: where the reference
    responses for the "reference_*" normalisations come from (the ``sft`` section's data).
    ``policy_temperature``: the PPO sampling temperature (``ppo.generation.temperature``), used
    for the "policy_samples" responses when ``cfg.sample_temperature`` is None.
    """

    stage = "rm"
    cfg: RMConfig

    def __init__(self, cfg: RMConfig, output_dir, *, resume: bool = False, overwrite: bool = False,
                 reference_data: Optional[DataConfig] = None, dist_info: Optional[DistInfo] = None,
                 policy_temperature: Optional[float] = None):
        validate(cfg, "rm")  # a config built in code skips load_config's checks (normalize_before needs policy_samples)
        if policy_temperature is not None and not policy_temperature > 0:
            raise ValueError(f"policy_temperature must be > 0, got {policy_temperature}")
        # every check that needs no model runs before the distributed set-up (super().__init__)
        reference_data = reference_data or DataConfig()
        entry = RM_NORMALIZATIONS[cfg.normalization]
        if entry.apply is not None and not entry.samples_policy:  # reference data, read after training: check it now
            _build.check_data_files(reference_data, "sft")
        init_path = cfg.sft_model or cfg.model.path
        for name, path in (("rm.sft_model", cfg.sft_model), ("rm.model.path", cfg.model.path)):
            if path is not None and not Path(path).is_dir():
                raise ValueError(f"{name} {path!r} is not a directory (a model written by rlhf-fast sft; "
                                 "nothing is downloaded)")
        if RM_NORMALIZATIONS[cfg.normalization].samples_policy and init_path is None:
            raise ValueError(
                "rm.normalization 'policy_samples' samples from the initial policy, but there is none: set "
                "rm.sft_model (or rm.model.path), or choose 'reference_mean', 'reference_std' or 'none'"
            )
        if entry.samples_policy and holds_reward_model(init_path):
            raise ValueError(
                f"rm.normalization 'policy_samples' samples from the initial policy, but {init_path} holds a reward "
                f"model ({describe_model_dir(init_path)}), which cannot generate: choose 'reference_mean', "
                "'reference_std' or 'none', or start from an SFT model")
        super().__init__(cfg, output_dir, resume=resume, overwrite=overwrite, dist_info=dist_info)
        self.sample_temperature = (cfg.sample_temperature if cfg.sample_temperature is not None
                                   else policy_temperature if policy_temperature is not None
                                   else GenerationConfig().temperature)
        self.reference_data, self.init_path = reference_data, init_path

    def build_datasets(self) -> None:
        cfg = self.cfg
        self.tokenizer = _build.load_tokenizer(cfg.model, cfg.data, source=self.init_path, section="rm.model")
        train, evals = _build.split_records(cfg.data, self.stage, lambda: _build.get_task(cfg.data).preference_records())
        kw = dict(
            prompt_field=cfg.data.prompt_field, chosen_field=cfg.data.chosen_field,
            rejected_field=cfg.data.rejected_field, messages_field=cfg.data.messages_field,
            max_prompt_length=cfg.data.max_prompt_length,
            max_response_length=cfg.data.max_response_length,
        )
        train_ds = PreferenceDataset(train, self.tokenizer, **kw)
        self.train_items = train_ds.items
        eval_ds = PreferenceDataset(evals, self.tokenizer, **kw)
        self.eval_items = eval_ds.items
        # the pool normalisation draws from: each prompt's tokens (a chat prompt rendered by the template)
        self.prompts = train_ds.prompt_ids
        self._collate = eval_ds.collator()

    def build_model(self) -> torch.nn.Module:
        src = _build.model_source(self.cfg.model, self.cfg.data, self.tokenizer, path=self.init_path)
        if not isinstance(src, str):  # a fresh model: build it as a causal LM so the vocabulary can grow
            src = load_causal_lm(src, seed=self.cfg.model.init_seed)
            resize_embeddings_for_tokenizer(src, self.tokenizer)
        # new_head: an SFT / plain LM gets a fresh head (N+: the RM starts from the SFT model); a
        # reward model (ours or an HF sequence classifier) keeps its trained one
        rm = RewardModel.from_pretrained(src, new_head=True, attn_implementation=self.cfg.model.attn_implementation,
                                         seed=self.cfg.model.init_seed)
        resize_embeddings_for_tokenizer(rm.backbone, self.tokenizer, what=f"rm model {src}")
        if self.cfg.lora.rank:  # adapters on the backbone; the score head is trained fully unless lora.train_head is off
            lora.add_lora(rm.backbone, self.cfg.lora, field="rm.lora")
            rm.head.requires_grad_(self.cfg.lora.train_head)
        set_packing(self.cfg.packing, "rm.packing", rm)
        return rm

    def collate(self, items: list) -> dict:
        return self._collate(items)

    def units(self, items: list) -> int:
        return len(items)

    def stat_keys(self):
        return ("loss_sum", "correct", "pairs", "tokens", "chosen_sum", "rejected_sum")

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        out = self.engine(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        n = batch["num_pairs"]
        # N details #9 (normalize_before): the loss reads gain * raw + bias with the fixed gain and
        # bias set before training; the gain scales the logits (and gradients), the bias cancels.
        scores = out.scores if self.cfg.normalize_before else out.raw_scores
        chosen, rejected = scores[:n], scores[n:]
        losses = bradley_terry_loss(chosen, rejected, self.cfg.margin)
        loss_sum = losses.sum()
        c, r = chosen.detach().float(), rejected.detach().float()
        stats = {
            "loss_sum": loss_sum.item(), "correct": float((c > r).sum()), "pairs": float(n),
            "tokens": float(batch["attention_mask"].sum()), "chosen_sum": float(c.sum()), "rejected_sum": float(r.sum()),
        }
        return loss_sum, stats

    def metrics(self, sums: dict, prefix: str) -> dict:
        pairs = max(sums.get("pairs", 0.0), 1.0)
        chosen, rejected = sums.get("chosen_sum", 0.0) / pairs, sums.get("rejected_sum", 0.0) / pairs
        return {
            f"{prefix}/loss": sums.get("loss_sum", 0.0) / pairs, f"{prefix}/accuracy": sums.get("correct", 0.0) / pairs,
            f"{prefix}/reward_chosen": chosen, f"{prefix}/reward_rejected": rejected,
            f"{prefix}/reward_margin": chosen - rejected, f"{prefix}/pairs": sums.get("pairs", 0.0),
        }

    def write_model(self, module, directory: Path) -> None:
        lora.save_model(module, directory, merged=self.cfg.lora.save_merged)
        self.tokenizer.save_pretrained(directory)

    # ---- normalisation ------------------------------------------------------------------------------

    def begin(self) -> dict:
        """N details #9 before training (``normalize_before``): gain and bias such that the
        untrained RM scores the initial policy's samples mean 0 / std 1. Only a run starting at
        step 0 gets here; gain and bias are module buffers, so a resumed run restores them from
        its checkpoint's engine state instead of recomputing them."""
        if not self.cfg.normalize_before:
            return {}
        stats = self._set_normalization("policy_samples", draw=0)
        self.engine.module.normalization["when"] = "before_training"
        return {f"norm_before/{k}": v for k, v in stats.items()}

    def finish(self) -> dict:
        """Sets the reward normalisation after training, from the raw scores (whatever gain and
        bias the loss used)."""
        mode = self.cfg.normalization
        if RM_NORMALIZATIONS[mode].apply is None:
            return {}
        rm: RewardModel = self.engine.module
        before = {"gain": float(rm.gain), "bias": float(rm.bias)} if self.cfg.normalize_before else None
        stats = self._set_normalization(mode, draw=1)  # draw 1 also after a resume that skipped draw 0
        if before is not None:  # provenance in the saved model: the mapping the loss trained with
            rm.normalization["before_training"] = before
        return {f"norm/{k}": v for k, v in stats.items()}

    def _set_normalization(self, mode: str, draw: int) -> dict:
        """Scores the sequences of ``mode`` and sets gain and bias from their raw scores (every
        rank computes the same scores; no collectives beyond ZeRO-3's own). ``draw``: which
        "policy_samples" draw (0 before training, 1 after: fresh samples each time, as
        lm-human-preferences' ``sample_fn``)."""
        entry = RM_NORMALIZATIONS[mode]
        ids, mask = self._policy_samples(draw) if entry.samples_policy else self._reference_sequences()
        raw = self._raw_scores(ids, mask)
        rm: RewardModel = self.engine.module
        entry.apply(rm, raw)
        return {"raw_mean": float(raw.mean()), "raw_std": float(raw.std(unbiased=False)),
                "gain": float(rm.gain), "bias": float(rm.bias), "samples": int(raw.numel())}

    @torch.no_grad()
    def _raw_scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.engine.eval()
        bs, out = 2 * self.cfg.eval_batch_size, []
        for i in range(0, ids.shape[0], bs):
            b_ids, b_mask = ids[i : i + bs].to(self.dist.device), mask[i : i + bs].to(self.dist.device)
            out.append(self.engine(b_ids, b_mask).raw_scores.float().cpu())
        return torch.cat(out)

    def _reference_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + reference response (+ EOS) from the SFT data (N+: the SFT dataset's reference summaries)."""
        from rlhf_fast.data import SFTDataset

        data = self.reference_data
        records, _ = _build.split_records(data, "sft", lambda: _build.get_task(data).sft_records())
        records = records[: self.cfg.normalization_samples]
        ds = SFTDataset(records, self.tokenizer, prompt_field=data.prompt_field, response_field=data.response_field,
                        messages_field=data.messages_field, max_prompt_length=data.max_prompt_length,
                        max_response_length=data.max_response_length)
        return left_pad([it["input_ids"] for it in ds.items], self.tokenizer.pad_token_id)

    def _draw_prompts(self, draw: int) -> list[list[int]]:
        """Draw ``draw``'s prompts (token ids): the ``draw``-th block of ``normalization_samples`` training
        prompts, wrapping around the pool (a pool smaller than a block repeats prompts)."""
        n, pool = self.cfg.normalization_samples, self.prompts
        if not pool:
            raise ValueError("rm.normalization 'policy_samples' needs prompts, but the training data has none")
        return [pool[(draw * n + i) % len(pool)] for i in range(n)]

    @torch.no_grad()
    def _policy_samples(self, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses sampled from the initial (SFT) policy at ``self.sample_temperature``, top_k 0,
        top_p 1 (N details #4, #9), cut after the first EOS. Draw ``draw`` (0 before training, the
        next after) takes its own prompts (``_draw_prompts``) and seed ``cfg.seed + draw``, the
        same on every rank: a draw is reproducible, and no two draws score the same samples."""
        policy = load_causal_lm(self.init_path).to(self.dist.device).eval()
        resize_embeddings_for_tokenizer(policy, self.tokenizer)
        tok = self.tokenizer
        stop_at_eos = self.cfg.sample_stop_at_eos
        if not stop_at_eos:  # generate() falls back to generation_config's EOS when given None
            policy.generation_config.eos_token_id = None
        prompts = self._draw_prompts(draw)
        p_ids, p_mask = left_pad(prompts, tok.pad_token_id)
        seqs = []
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + draw)
            for i in range(0, p_ids.shape[0], self.cfg.eval_batch_size):
                sl = slice(i, i + self.cfg.eval_batch_size)
                out = policy.generate(
                    input_ids=p_ids[sl].to(self.dist.device), attention_mask=p_mask[sl].to(self.dist.device),
                    do_sample=True, temperature=self.sample_temperature, top_k=0, top_p=1.0,
                    max_new_tokens=self.cfg.sample_max_new_tokens, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id if stop_at_eos else None,
                )
                seqs.append(out.cpu())
        width = max(s.shape[1] for s in seqs)
        ids = torch.cat([F.pad(s, (0, width - s.shape[1]), value=tok.pad_token_id) for s in seqs])
        P = p_ids.shape[1]
        resp = ids[:, P:]
        if stop_at_eos:
            is_eos = resp == tok.eos_token_id
            after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # positions after the first EOS
            resp_mask = (~after_eos) & (resp != tok.pad_token_id)
        else:  # every row sampled to full length, EOS an ordinary token (lm-human-preferences)
            resp_mask = torch.ones_like(resp, dtype=torch.bool)
        mask = torch.cat([p_mask, resp_mask.long()], dim=1)
        del policy
        return ids, mask


def train_rm(cfg: RMConfig, output_dir, *, resume: bool = False, overwrite: bool = False,
             reference_data: Optional[DataConfig] = None, policy_temperature: Optional[float] = None) -> dict:
    """Runs the reward-model stage; returns its last logged metrics. ``resume`` / ``overwrite``: what
    to do with a previous run in ``output_dir`` (``rlhf_fast.trainers.run.guard``)."""
    return RMTrainer(cfg, output_dir, resume=resume, overwrite=overwrite, reference_data=reference_data,
                     policy_temperature=policy_temperature).fit()

"""Supervised fine-tuning: next-token loss on the responses (or on whole sequences) of prompt +
reference-response pairs, on a DeepSpeed engine.

The loss is the mean over every target token of the global batch (not a mean of per-micro-batch
means), so the gradient does not depend on how the batch is cut into micro-batches and ranks.
Log-probs come from ``rlhf_fast.ops.gather_logprobs``, which never materialises a float32
(B, T, V) log-softmax.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_fast import ops
from rlhf_fast.config import SFTConfig
from rlhf_fast.data import IGNORE_INDEX, SFTDataset
from rlhf_fast.models import Policy, load_causal_lm, lora, resize_embeddings_for_tokenizer
from rlhf_fast.models.backbone import backbone_of
from rlhf_fast.models.packing import attention_context, packed_lm_batch, plan_for, resolve_packing
from rlhf_fast.trainers import _build
from rlhf_fast.trainers.stage_loop import DatasetStageTrainer


#: ``sft.loss_on``: whether the prompt tokens are targets too ("all") or only the response's
LOSS_ON_PROMPT = {"response": False, "all": True}


class SFTTrainer(DatasetStageTrainer):
    """``SFTTrainer(cfg.sft, "out/sft").fit()`` writes ``out/sft/model`` (a policy in HF format,
    with its tokenizer) and returns the last logged metrics (``train/loss``, ``eval/loss``,
    ``eval/perplexity``...).

    ``cfg``: an ``SFTConfig`` (``load_config(...).sft`` or built in code). The model is
    ``cfg.model.path`` (a local ``save_pretrained`` directory holding its tokenizer, or
    ``cfg.model.tokenizer_path``) or, without a path, a fresh ``cfg.model.arch`` model on the
    built-in task's tokenizer. Data: ``cfg.data.train_file`` (text ``prompt`` / ``response`` or
    chat ``messages`` records, ``rlhf_fast.data.chat``) or the built-in task; every record is
    checked here, before distributed set-up. ``output_dir``: the stage directory (metrics.jsonl,
    tensorboard/, checkpoints/, model/). ``resume``: continue from ``output_dir``'s latest
    checkpoint. ``dist_info``: an already initialised process group (the pipeline passes one)."""

    stage = "sft"
    cfg: SFTConfig

    def build_datasets(self) -> None:
        cfg = self.cfg
        self.tokenizer = _build.load_tokenizer(cfg.model, cfg.data, section="sft.model")
        train, evals = _build.split_records(cfg.data, self.stage, lambda: _build.get_task(cfg.data).sft_records())
        kw = dict(
            prompt_field=cfg.data.prompt_field, response_field=cfg.data.response_field,
            messages_field=cfg.data.messages_field,
            max_prompt_length=cfg.data.max_prompt_length, max_response_length=cfg.data.max_response_length,
            train_on_prompt=LOSS_ON_PROMPT[cfg.loss_on],
        )
        self.train_items = SFTDataset(train, self.tokenizer, **kw).items
        eval_ds = SFTDataset(evals, self.tokenizer, **kw)
        self.eval_items = eval_ds.items
        self._collate = eval_ds.collator()

    def build_model(self) -> torch.nn.Module:
        src = _build.model_source(self.cfg.model, self.cfg.data, self.tokenizer)
        model = load_causal_lm(src, attn_implementation=self.cfg.model.attn_implementation, seed=self.cfg.model.init_seed)
        resize_embeddings_for_tokenizer(model, self.tokenizer, what=f"sft model {src}" if isinstance(src, str) else
                                        "sft model")
        if self.cfg.lora.rank:  # adapters on the (resized) model; the engine trains only them
            lora.add_lora(model, self.cfg.lora, field="sft.lora")
        self.packing = resolve_packing(self.cfg.packing, backbone_of(model), field="sft.packing")
        return model

    def collate(self, items: list) -> dict:
        return self._collate(items)

    def units(self, items: list) -> int:
        # Target tokens: labels shifted by one (the first token of a sequence predicts nothing).
        return sum(int((it["labels"][1:] != IGNORE_INDEX).sum()) for it in items)

    def stat_keys(self):
        return ("nll", "targets", "tokens", "sequences")

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits, labels = self._logits_and_targets(batch)
        logprobs = ops.gather_logprobs(logits, labels, ignore_index=IGNORE_INDEX)
        nll = -logprobs.sum()
        stats = {
            "nll": nll.detach().item(), "targets": int((labels != IGNORE_INDEX).sum()),
            "tokens": int(batch["attention_mask"].sum()), "sequences": int(batch["input_ids"].shape[0]),
        }
        return nll, stats

    def _logits_and_targets(self, batch: dict):
        """Logits and the labels they predict: padded, ``logits[:, :-1]`` / ``labels[:, 1:]``;
        with ``sft.packing`` the packed rows and their next-token targets (models/packing.py)."""
        plan = plan_for(self.engine.module, batch["attention_mask"]) if self.packing else None
        if plan is not None:  # None: padded (packing off, or a mask with a hole)
            kwargs, labels = packed_lm_batch(plan, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             ignore_index=IGNORE_INDEX)
            with attention_context(self.engine.module, plan.width):
                out = self.engine(**kwargs)
            return (out.logits if hasattr(out, "logits") else out[0]), labels
        with attention_context(self.engine.module, batch["input_ids"].shape[1]):
            out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        # the first token of a left-padded sequence is predicted by a pad state: not a target
        # (``units`` does not count it either; with loss_on "all" its label is set)
        labels = batch["labels"][:, 1:].masked_fill(~batch["attention_mask"][:, :-1].bool(), IGNORE_INDEX)
        return logits[:, :-1], labels

    def metrics(self, sums: dict, prefix: str) -> dict:
        loss = sums.get("nll", 0.0) / max(sums.get("targets", 0.0), 1.0)
        out = {f"{prefix}/loss": loss, f"{prefix}/tokens": sums.get("tokens", 0.0)}
        if prefix == "eval":
            out["eval/perplexity"] = math.exp(min(loss, 50.0))
        return out

    def write_model(self, module, directory: Path) -> None:
        lora.save_model(Policy(module), directory, merged=self.cfg.lora.save_merged)
        self.tokenizer.save_pretrained(directory)


def train_sft(cfg: SFTConfig, output_dir, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Runs the SFT stage; returns its last logged metrics. ``resume`` / ``overwrite``: what to do
    with a previous run in ``output_dir`` (``rlhf_fast.trainers.run.guard``)."""
    return SFTTrainer(cfg, output_dir, resume=resume, overwrite=overwrite).fit()

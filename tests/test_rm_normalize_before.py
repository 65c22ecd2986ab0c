"""``rm.normalize_before`` ("N Implementation Details" #9, lm-human-preferences'
``normalize_before``): gain and bias set from the initial policy's samples before the first
optimizer step, the Bradley-Terry loss on ``gain * raw + bias``, the after-training normalisation
on the raw scores again, a resumed run that keeps the before-training numbers, and the config check.

The runs use a 2-layer, 32-wide policy trained for 2 SFT steps (the init policy only has to
sample) and a few RM steps: they test the plumbing, not quality."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import config as C
from rlhf_fast.cli import main
from rlhf_fast.models import RewardModel
from rlhf_fast.models.reward import RewardOutput
from rlhf_fast.tasks import tiny_config
from rlhf_fast.trainers.rm import RMTrainer
from rlhf_fast.trainers.run.metrics_log import read_metrics
from rlhf_fast.trainers.sft import train_sft

QUIET = ["--sft.logging.progress_bar", "false", "--rm.logging.progress_bar", "false",
         "--sft.logging.tensorboard", "false", "--rm.logging.tensorboard", "false"]
SFT = ["--sft.model.size", "test", "--sft.model.config_overrides", "{}", "--sft.batch_size", "16",
       "--sft.micro_batch_size", "16", "--sft.data.max_train_examples", "64", "--sft.data.max_eval_examples", "16",
       "--sft.max_steps", "2", "--sft.logging.eval_every", "0"]
RM_STEPS = 4
RM = ["--rm.normalize_before", "true", "--rm.batch_size", "16", "--rm.micro_batch_size", "8",
      "--rm.max_steps", str(RM_STEPS), "--rm.data.max_train_examples", "96", "--rm.data.max_eval_examples", "32",
      "--rm.eval_batch_size", "32", "--rm.normalization_samples", "48", "--rm.sample_max_new_tokens", "8",
      "--rm.logging.log_every", "1", "--rm.logging.eval_every", "0", "--rm.logging.save_every", "2",
      "--rm.scheduler.warmup_steps", "0"]


def _cfg(*overrides):
    return C.load_config(presets=["ci"], overrides=[*QUIET, *SFT, *RM, *overrides])


def _population_moments(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std(unbiased=False))


@pytest.fixture(scope="module")
def init_policy(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train_sft(_cfg().sft, out)
    return out / "model"


class _Probe(RMTrainer):
    """Records, at the first optimizer step, the gain / bias in force and the normalised scores of
    the initial policy's samples (draw 0, drawn again through ``_policy_samples``)."""

    probe: dict

    def train_step(self, global_batch):
        if not hasattr(self, "probe"):
            rm = self.engine.module
            raw = self._raw_scores(*self._policy_samples(0))
            self.probe = {"gain": float(rm.gain), "bias": float(rm.bias), "raw": raw, "normalised": rm.normalize(raw)}
        return super().train_step(global_batch)


@pytest.fixture(scope="module")
def run(init_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    trainer = _Probe(_cfg("--rm.sft_model", str(init_policy)).rm, out)
    final = trainer.fit()
    return SimpleNamespace(out=out, trainer=trainer, final=final)


def test_normalised_before_first_step(run):
    """Right before the first optimizer step the initial policy's samples score mean 0 / population
    std 1, and gain / bias are 1 / std and -mean / std of their raw scores (computed here)."""
    p = run.trainer.probe
    mean, std = _population_moments(p["normalised"])
    assert abs(mean) < 1e-5 and std == pytest.approx(1.0, abs=1e-5)
    raw_mean, raw_std = _population_moments(p["raw"])
    assert p["gain"] == pytest.approx(1.0 / raw_std, rel=1e-5)
    assert p["bias"] == pytest.approx(-raw_mean / raw_std, rel=1e-5, abs=1e-6)
    row0 = read_metrics(run.out)[0]
    assert row0["step"] == 0 and row0["norm_before/samples"] == p["raw"].numel() == 48
    assert row0["norm_before/gain"] == pytest.approx(p["gain"]) and row0["norm_before/bias"] == pytest.approx(p["bias"])
    assert row0["norm_before/raw_std"] == pytest.approx(raw_std, rel=1e-5)


def test_fit_ends_normalised_on_policy_samples(run):
    """The after-training normalisation maps the trained RM's raw scores on fresh policy samples
    (draw 1) to mean 0 / std 1 (it starts from the raw scores, not from the before-training mapping)."""
    rows = read_metrics(run.out)
    assert [r["step"] for r in rows] == list(range(RM_STEPS + 1)) and rows[-1] == {**run.final, "step": RM_STEPS}
    rm = RewardModel.from_pretrained(run.out / "model").eval()
    ids, mask = run.trainer._policy_samples(1)
    raw = rm.raw_scores(ids, mask, batch_size=32)
    mean, std = _population_moments(rm.normalize(raw))
    assert abs(mean) < 1e-5 and std == pytest.approx(1.0, abs=1e-5)
    before = run.trainer.probe
    assert rm.normalization["mode"] == "samples"
    assert rm.normalization["before_training"] == pytest.approx({"gain": before["gain"], "bias": before["bias"]})
    assert float(rm.gain) != pytest.approx(before["gain"], rel=1e-4)  # training moved the raw scores
    assert rows[-1]["norm/gain"] == pytest.approx(float(rm.gain))


class _FirstStep(RMTrainer):
    """Records (step, gain, bias) at its first optimizer step."""

    def train_step(self, global_batch):
        rm = self.engine.module
        self.__dict__.setdefault("first", (self.step, float(rm.gain), float(rm.bias)))
        return super().train_step(global_batch)


def test_resume_keeps_before_normalisation(init_policy, run, tmp_path, monkeypatch):
    """A run stopped after step 2 and resumed restores gain / bias from its checkpoint (no new
    before-training normalisation) and logs what the uninterrupted run logged."""
    cfg = _cfg("--rm.sft_model", str(init_policy))
    RMTrainer(dataclasses.replace(cfg.rm, stop_after_steps=2), tmp_path).fit()
    assert read_metrics(tmp_path)[-1]["step"] == 2

    calls = []
    monkeypatch.setattr(RMTrainer, "begin", lambda self: calls.append("begin") or {})
    resumed = _FirstStep(cfg.rm, tmp_path, resume=True)
    resumed.fit()
    assert calls == [] and resumed.first == (2, run.trainer.probe["gain"], run.trainer.probe["bias"])
    a, b = read_metrics(run.out), read_metrics(tmp_path)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("perf/"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def _stub_trainer(gain: float, bias: float, raw: torch.Tensor, **cfg):
    """An RMTrainer with only what ``micro_step`` reads: the config and an engine returning the
    given raw scores (chosen rows first) normalised by a real RewardModel's gain / bias buffers."""
    rm = RewardModel.from_pretrained(tiny_config("gpt2", vocab_size=16), new_head=True, seed=0)
    rm.gain.fill_(gain)
    rm.bias.fill_(bias)
    t = RMTrainer.__new__(RMTrainer)
    t.cfg = dataclasses.replace(C.RMConfig(), **cfg)
    t.engine = lambda ids, mask, pos: RewardOutput(scores=rm.normalize(raw), raw_scores=raw, rewards=raw[:, None],
                                                    hidden=raw[:, None, None])
    batch = {"input_ids": torch.zeros(raw.numel(), 3, dtype=torch.long), "position_ids": None,
             "attention_mask": torch.ones(raw.numel(), 3, dtype=torch.long), "num_pairs": raw.numel() // 2}
    return t, batch


def test_loss_reads_normalised_scores():
    """chosen raw (2, 0), rejected raw (1, 0.5), gain 3, bias 5: the loss is
    softplus(-3 * 1) + softplus(-3 * -0.5) (the bias cancels); without normalize_before it is
    softplus(-1) + softplus(0.5). A margin acts on the normalised scale."""
    raw = torch.tensor([2.0, 0.0, 1.0, 0.5], requires_grad=True)
    t, batch = _stub_trainer(3.0, 5.0, raw, normalize_before=True)
    loss, stats = t.micro_step(batch)
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-3.0)) + math.log1p(math.exp(1.5))))
    want = -F.logsigmoid(3.0 * (raw[:2] - raw[2:])).sum()
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, raw)
    s = torch.sigmoid(torch.tensor([3.0, -1.5]))  # d/d(rc) of -logsigmoid(g * (rc - rr)) = -g * (1 - sigmoid(g d))
    torch.testing.assert_close(grad, torch.cat([-3.0 * (1 - s), 3.0 * (1 - s)]))
    assert stats["chosen_sum"] == pytest.approx(3 * 2 + 5 + 3 * 0 + 5)  # metrics on the normalised scale
    assert stats["correct"] == 1.0

    t, batch = _stub_trainer(3.0, 5.0, raw.detach(), normalize_before=True, margin=0.5)
    torch.testing.assert_close(t.micro_step(batch)[0], -F.logsigmoid(torch.tensor([3.0, -1.5]) - 0.5).sum())
    t, batch = _stub_trainer(3.0, 5.0, raw.detach(), normalize_before=False, normalization="none")
    torch.testing.assert_close(t.micro_step(batch)[0], torch.tensor(math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))))


def test_normalize_before_needs_policy_samples(tmp_path, capsys):
    msg = r"rm\.normalize_before needs rm\.normalization 'policy_samples' \(got 'reference_mean'\)"
    with pytest.raises(ValueError, match=msg):
        C.load_config(overrides=["--rm.normalize_before", "true", "--rm.normalization", "reference_mean"])
    with pytest.raises(ValueError, match=msg):  # a config built in code is checked by the trainer
        RMTrainer(dataclasses.replace(C.RMConfig(), normalize_before=True, normalization="reference_mean"), tmp_path)
    for preset in ("lm_human_preferences", "n_details"):
        rm = C.load_config(presets=[preset]).rm
        assert rm.normalize_before and rm.normalization == "policy_samples"
    assert not C.load_config(presets=["ci"]).rm.normalize_before
    assert main(["config", "--docs"]) == 0
    docs = capsys.readouterr().out
    assert "rm.normalize_before = False\n" in docs and "N Implementation Details\" #9" in docs


def test_draws_are_fresh_and_reproducible(run):
    """Before and after training score different samples (the next block of prompts, seed + 1),
    as lm-human-preferences draws anew for each normalisation; a draw repeats exactly; the
    prompt blocks wrap around the pool."""
    t = run.trainer
    n = t.cfg.normalization_samples
    p0, p1 = t._draw_prompts(0), t._draw_prompts(1)
    assert p0 == t.prompts[:n] and p1 == [t.prompts[(n + i) % len(t.prompts)] for i in range(n)] and p0 != p1
    (a, am), (b, bm) = t._policy_samples(0), t._policy_samples(1)
    a2, am2 = t._policy_samples(0)
    assert torch.equal(a, a2) and torch.equal(am, am2)
    assert a.shape[0] == b.shape[0] == n and not torch.equal(a[:, -8:], b[:, -8:])
    small = dataclasses.replace(t.cfg, normalization_samples=len(t.prompts) + 3)
    t2 = RMTrainer.__new__(RMTrainer)
    t2.cfg, t2.prompts = small, t.prompts
    assert t2._draw_prompts(0) == t.prompts + t.prompts[:3]


def test_sample_temperature_follows_ppo(init_policy, tmp_path):
    """None (the default): the PPO sampling temperature passed in (the pipeline and ``rlhf-fast rm``
    pass ``ppo.generation.temperature``), else 0.7; an explicit value wins; the N-details presets
    use lm-human-preferences' 0.7."""
    cfg = _cfg("--rm.sft_model", str(init_policy), "--ppo.generation.temperature", "0.9").rm
    assert cfg.sample_temperature is None
    assert RMTrainer(cfg, tmp_path / "a", policy_temperature=0.9).sample_temperature == 0.9
    assert RMTrainer(cfg, tmp_path / "b").sample_temperature == C.GenerationConfig().temperature == 0.7
    fixed = dataclasses.replace(cfg, sample_temperature=1.0)
    assert RMTrainer(fixed, tmp_path / "c", policy_temperature=0.9).sample_temperature == 1.0
    with pytest.raises(ValueError, match="policy_temperature must be > 0"):
        RMTrainer(cfg, tmp_path / "d", policy_temperature=0.0)
    with pytest.raises(ValueError, match=r"rm\.sample_temperature.*a number > 0 or null"):
        C.load_config(overrides=["--rm.sample_temperature", "0"])
    assert C.load_config(presets=["n_details"]).rm.sample_temperature == 0.7
    lhp = C.load_config(presets=["lm_human_preferences"])
    assert lhp.rm.sample_temperature is None and lhp.ppo.generation.temperature == 0.7


def test_later_preset_wins_rm_normalisation():
    """n_plus (reference-mean, nothing before training) and lm_human_preferences (policy samples
    before and after) combine in either order; the later one decides the RM normalisation."""
    a = C.load_config(presets=["lm_human_preferences", "n_plus"]).rm
    assert (a.normalization, a.normalize_before) == ("reference_mean", False)
    b = C.load_config(presets=["n_plus", "lm_human_preferences"]).rm
    assert (b.normalization, b.normalize_before) == ("policy_samples", True)

"""Typed configs: YAML, presets, dotted overrides, clear errors; derived batch plan; the lr schedule
and the TF-style Adam epsilon; data order and sharding; the CLI's parsing and errors. Fast: no
training here."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from rlhf_fast import config as C
from rlhf_fast.cli import build_parser, main, parse
from rlhf_fast.trainers.data_order import epoch_order, rank_micro_batches, total_steps_of
from rlhf_fast.trainers.deepspeed_setup import WarmupDecayLR, deepspeed_config_dict, lr_factor


def test_defaults_valid_and_every_field_documented():
    cfg = C.RunConfig()
    C.validate(cfg)
    rows = C.describe()
    assert len(rows) > 60
    undocumented = [path for path, _, doc in rows if not doc]
    assert not undocumented, undocumented


def test_yaml_presets_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("presets: [ci]\nsft:\n  optim:\n    lr: 3e-6\n  deepspeed: {zero_stage: 1}\nrm:\n  margin: 0.5\n")
    cfg = C.load_config(path, presets=["n_details"],
                        overrides=["--rm.lr", "3e-6", "--sft.deepspeed.zero_stage=2", "--rm.optim.betas", "0.8,0.99"])
    assert cfg.sft.optim.lr == 3e-6  # file beats its own preset ("3e-6" is a string to PyYAML)
    assert cfg.sft.deepspeed.zero_stage == 2  # override beats the file
    assert cfg.rm.optim.lr == 3e-6 and cfg.rm.margin == 0.5
    assert cfg.rm.optim.betas == (0.8, 0.99)
    assert cfg.rm.optim.tf_adam_eps is True  # from the n_details preset
    assert cfg.sft.model.config_overrides["n_layer"] == 2  # from the file's ci preset
    # a dumped config loads back to the same thing
    again = tmp_path / "again.yaml"
    again.write_text(C.dump_yaml(cfg))
    assert C.load_config(again) == cfg


@dataclasses.dataclass
class _Twin:
    a: C.OptimConfig = dataclasses.field(default_factory=C.OptimConfig)
    b: C.OptimConfig = dataclasses.field(default_factory=C.OptimConfig)


@dataclasses.dataclass
class _Root:
    x: _Twin = dataclasses.field(default_factory=_Twin)


def test_shorthand_paths_and_default_section():
    pairs = C.parse_overrides(["--lr", "1e-4", "--zero_stage", "3", "--rm.seed=7"], default_section="sft")
    assert pairs == [("sft.lr", "1e-4"), ("sft.zero_stage", "3"), ("rm.seed", "7")]
    cfg = C.load_config(overrides=pairs)
    assert cfg.sft.optim.lr == 1e-4 and cfg.sft.deepspeed.zero_stage == 3 and cfg.rm.seed == 7
    assert C.resolve_path(C.RunConfig, "rm.lr") == "rm.optim.lr"
    assert C.resolve_path(C.RunConfig, "sft.path") == "sft.model.path"
    with pytest.raises(ValueError, match=r"ambiguous field 'x.lr': could be x.a.lr, x.b.lr"):
        C.resolve_path(_Root, "x.lr")
    # an exact path is never shortened: sft.seed is the stage's seed, not model.init_seed
    assert C.resolve_path(C.RunConfig, "sft.seed") == "sft.seed"


@pytest.mark.parametrize(
    "override, message",
    [
        (["--rm.optim.lr", "-1"], r"rm\.optim\.lr: expected a number > 0"),
        (["--rm.optim.lr", "fast"], r"rm\.optim\.lr: expected a number, got 'fast'"),
        (["--sft.deepspeed.zero_stage", "4"], r"sft\.deepspeed\.zero_stage: expected one of 0, 1, 2, 3"),
        (["--sft.deepspeed.dtype", "fp8"], r"sft\.deepspeed\.dtype: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        (["--rm.normalization", "zscore"], r"rm\.normalization: expected one of 'policy_samples'"),
        (["--sft.batch_size", "2.5"], r"sft\.batch_size: expected an integer"),
        (["--sft.optim.tf_adam_eps", "maybe"], r"sft\.optim\.tf_adam_eps: expected true or false"),
        (["--rm.optim.betas", "0.9"], r"rm\.optim\.betas: expected a list of 2 numbers"),
        (["--rm.optim.betas", "0.9,1.5"], r"rm\.optim\.betas: expected two numbers in \[0, 1\)"),
        (["--sft.optim.foo", "1"], r"unknown field 'sft\.optim\.foo'; sft\.optim has: lr, betas"),
        (["--dpo.lr", "1"], r"unknown field 'dpo\.lr'"),
        (["--sft.batch_size", "48", "--sft.micro_batch_size", "32"], r"sft\.batch_size \(48\) must be a multiple"),
        (["--rm.deepspeed.offload_optimizer", "true"], r"rm\.deepspeed\.offload_optimizer needs rm\.deepspeed\.zero_stage >= 1"),
        (["--rm.deepspeed.zero_stage", "2", "--rm.deepspeed.offload_params", "true"], r"offload_params needs .*zero_stage 3"),
        (["--rm.scheduler.decay", "step"], r"rm\.scheduler\.decay: expected one of 'linear', 'cosine', 'constant'"),
        (["--ppo.seed", "-5"], r"ppo\.seed: expected an integer in \[0, 2\*\*31\), got -5"),
        (["--sft.seed", "100000000000000"], r"sft\.seed: expected an integer in \[0, 2\*\*31\)"),
        (["--rm.model.init_seed", "-1"], r"rm\.model\.init_seed: expected an integer in \[0, 2\*\*31\)"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        C.load_config(overrides=override)


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        C.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rm:\n  optim:\n    learning_rate: 1e-3\n")
    with pytest.raises(ValueError, match=r"unknown field 'rm\.optim\.learning_rate'"):
        C.load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        C.load_config(bad)
    bad.write_text("sft: [1, 2]\n")
    with pytest.raises(ValueError, match=r"sft: expected a mapping"):
        C.load_config(bad)
    with pytest.raises(ValueError, match="unknown preset 'fastest'; presets: ci"):
        C.load_config(presets=["fastest"])
    with pytest.raises(ValueError, match="is a directory, not a YAML file"):
        C.load_config(tmp_path)
    ok = tmp_path / "ok.yaml"
    ok.write_text("presets: ci\nppo:\nsft:\n  seed: 3\n")  # one preset as a string; an empty section
    cfg = C.load_config(ok)
    assert cfg.sft.seed == 3 and cfg.rm == C.load_config(presets=["ci"]).rm and cfg.ppo == C.load_config(presets=["ci"]).ppo


def test_presets_are_valid():
    for name in C.PRESETS:
        C.load_config(presets=[name])


def test_batch_plan_derived_once():
    cfg = C.load_config(overrides=["--sft.batch_size", "64", "--sft.micro_batch_size", "8"])
    assert C.BatchPlan.resolve(cfg.sft, 2) == C.BatchPlan(64, 8, 4, 2)
    with pytest.raises(ValueError, match=r"batch_size \(64\) must be a multiple of micro_batch_size x world size"):
        C.BatchPlan.resolve(cfg.sft, 3)
    cfg.sft.deepspeed.grad_accum = 2
    with pytest.raises(ValueError, match=r"deepspeed.grad_accum \(2\) x micro_batch_size \(8\) x world size \(2\) = 32"):
        C.BatchPlan.resolve(cfg.sft, 2, path="sft.")
    plan = C.BatchPlan.resolve(cfg.sft, 4)
    ds = deepspeed_config_dict(cfg.sft.deepspeed, plan)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 2)


def test_lr_schedule_shapes():
    f = lambda s, d: lr_factor(s, total_steps=10, warmup_steps=2, decay=d)  # noqa: E731
    assert [f(s, "linear") for s in (0, 1)] == [1 / 3, 2 / 3]
    assert f(2, "linear") == 1.0 and f(10, "linear") == 0.0 and math.isclose(f(6, "linear"), 0.5)
    assert math.isclose(f(6, "cosine"), 0.5) and f(10, "cosine") == 0.0 and f(9, "constant") == 1.0
    assert lr_factor(10, total_steps=10, warmup_steps=0, decay="linear", min_ratio=0.1) == pytest.approx(0.1)


def _tf_adam(params, grads, lr, b1, b2, eps):
    """TensorFlow's Adam (tf.compat.v1.train.AdamOptimizer), written out by hand."""
    m = torch.zeros_like(params)
    v = torch.zeros_like(params)
    p = params.clone()
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - lr_t * m / (v.sqrt() + eps)
    return p


def test_tf_style_adam_epsilon_matches_tf_adam():
    torch.manual_seed(0)
    init = torch.randn(7, dtype=torch.float64)
    grads = [torch.randn(7, dtype=torch.float64) * 1e-3 for _ in range(5)]  # small grads: eps matters
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-5
    results = {}
    for tf in (False, True):
        p = torch.nn.Parameter(init.clone())
        opt = torch.optim.Adam([p], lr=lr, betas=(b1, b2), eps=eps)
        sched = WarmupDecayLR(opt, total_steps=100, warmup_steps=0, decay="constant", tf_eps=(eps, b2) if tf else None)
        for g in grads:
            p.grad = g.clone()
            opt.step()
            sched.step()
        results[tf] = p.detach()
    want = _tf_adam(init, grads, lr, b1, b2, eps)
    torch.testing.assert_close(results[True], want, rtol=1e-12, atol=1e-14)
    assert (results[False] - want).abs().max() > 1e-6  # plain PyTorch Adam differs


def test_data_order_and_sharding():
    order = epoch_order(100, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(100))
    assert not np.array_equal(order, epoch_order(100, seed=3, epoch=2))
    batch = list(range(16))
    one = rank_micro_batches(batch, C.BatchPlan(16, 8, 2, 1), 0)
    two = [rank_micro_batches(batch, C.BatchPlan(16, 8, 1, 2), r) for r in (0, 1)]
    assert one == [two[0][0], two[1][0]]  # 1 rank x 2 micro-batches == 2 ranks x 1
    assert total_steps_of(100, 16, 1.5, None) == 9 and total_steps_of(100, 16, 1.0, 4) == 4
    with pytest.raises(ValueError, match="fewer than one global batch"):
        total_steps_of(10, 16, 1.0, None)


def test_cli_parsing_and_help(capsys, tmp_path):
    cmd, cfg, args = parse(["rm", "--output-dir", str(tmp_path), "--preset", "ci", "--lr", "3e-6", "--rm.zero_stage", "2"])
    assert cmd.name == "rm" and cfg.rm.optim.lr == 3e-6 and cfg.rm.deepspeed.zero_stage == 2
    assert cfg.rm.max_steps == C.PRESETS["ci"]["rm.max_steps"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("sft", "rm", "--rm.optim.lr", "presets: ci", "torchrun"):
        assert word in out
    assert main(["config", "--preset", "n_plus"]) == 0
    assert "lr: 3.0e-06" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["sft", "--output-dir", str(tmp_path), "--sft.data.train_file", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "sft.data.train_file" in err and "does not exist" in err and "Traceback" not in err
    assert main(["rm", "--output-dir", str(tmp_path), "--rm.deepspeed.zero_stage", "9"]) == 2
    assert "rm.deepspeed.zero_stage: expected one of 0, 1, 2, 3, got 9" in capsys.readouterr().err
    a_file = tmp_path / "afile"
    a_file.write_text("")
    assert main(["ppo", "--output-dir", str(a_file)]) == 2
    assert f"--output-dir '{a_file}' exists and is not a directory" in capsys.readouterr().err


def test_config_docs_show_the_resolved_values(capsys):
    """``rlhf-fast config --preset X --docs``: the values the preset resolves to, with the default
    where it differs (the docs used to ignore the preset)."""
    assert main(["config", "--preset", "n_plus", "--docs"]) == 0
    out = capsys.readouterr().out
    assert "rm.normalization = 'reference_mean'   (default: 'policy_samples')\n" in out
    assert "rm.margin = 0.0\n" in out

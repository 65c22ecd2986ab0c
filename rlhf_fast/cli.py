"""The ``rlhf-fast`` command.

    rlhf-fast sft --output-dir runs/sft                       # SFT on the built-in task
    rlhf-fast rm --output-dir runs/rm --rm.sft_model runs/sft/model
    rlhf-fast rm --preset ci --output-dir runs/rm             # trains its own small SFT model first
    rlhf-fast sft --config run.yaml --sft.deepspeed.zero_stage 2 --sft.lr 1e-4 --resume --output-dir runs/sft
    torchrun --nproc_per_node 8 -m rlhf_fast.cli sft --config run.yaml --output-dir runs/sft
    rlhf-fast ppo --output-dir runs/ppo --ppo.policy.path runs/sft/model --ppo.reward.model_path runs/rm/model
    rlhf-fast pipeline --output-dir runs/demo                 # SFT -> RM -> PPO on the built-in task
    rlhf-fast pipeline --task tiny_arithmetic --preset grpo   # SFT -> GRPO on a checked reward (no RM)
    rlhf-fast config --preset n_plus --docs                   # the resolved config, with every field's doc

Subcommands live in ``COMMANDS`` (name -> ``Command``); a new stage registers itself with
``@command("ppo", help=...)`` and receives the resolved ``RunConfig`` and the parsed arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rlhf_fast import config as C
from rlhf_fast.trainers.run.stopping import (
    EXIT_CHECKPOINT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_RANK_LOST,
    CheckpointWriteError,
    Preempted,
    RankLost,
)


@dataclass
class Command:
    """A subcommand: ``run(cfg, args) -> exit code``; ``section`` is the config section that bare
    overrides (``--lr``) refer to; ``trains``: whether it takes --output-dir / --resume."""

    name: str
    help: str
    description: str
    run: Callable[[C.RunConfig, argparse.Namespace], int]
    section: Optional[str] = None
    trains: bool = True


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, description: str = "", section: Optional[str] = None, trains: bool = True):
    """Registers a subcommand (decorator)."""

    def wrap(fn):
        COMMANDS[name] = Command(name, help, textwrap.dedent(description or fn.__doc__ or help).strip(), fn,
                                 section if section is not None else name, trains)
        return fn

    return wrap


# ---- the subcommands -----------------------------------------------------------------------------------


def _summary(metrics: dict, output_dir: Path) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    print(json.dumps({"output_dir": str(output_dir), **{k: v for k, v in metrics.items() if k.startswith(("eval/", "norm/"))}}))


@command("sft", help="supervised fine-tuning of the policy", description="""
    Supervised fine-tuning on prompt + response pairs (config section `sft`). Without
    sft.data.train_file it trains on the built-in tiny_sentiment task. Writes DIR/model (HF format
    + tokenizer), DIR/metrics.jsonl, DIR/tensorboard and DIR/checkpoints.""")
def run_sft(cfg: C.RunConfig, args: argparse.Namespace) -> int:
    from rlhf_fast.trainers.sft import train_sft

    _summary(train_sft(cfg.sft, args.output_dir, resume=args.resume, overwrite=args.overwrite), args.output_dir)
    return 0


@command("rm", help="reward-model training (Bradley-Terry) and normalisation", description="""
    Reward-model training on preference pairs (config section `rm`), then its normalisation.
    The RM starts from rm.sft_model (an SFT output, e.g. runs/sft/model) or rm.model.path; when
    neither is set it first runs the `sft` section into DIR/sft (reused when DIR/sft/model
    exists) and starts from DIR/sft/model. Without rm.data.train_file it trains on the built-in
    task's preference pairs.""")
def run_rm(cfg: C.RunConfig, args: argparse.Namespace) -> int:
    from rlhf_fast.trainers.rm import train_rm

    if cfg.rm.sft_model is None and cfg.rm.model.path is None:
        sft_dir = Path(args.output_dir) / "sft"
        if not (sft_dir / "model" / "config.json").is_file():
            from rlhf_fast.trainers.sft import train_sft

            train_sft(cfg.sft, sft_dir, resume=args.resume, overwrite=args.overwrite)
        else:  # reused: only when the sft section still describes it
            from rlhf_fast.trainers.pipeline import check_finished_stage

            try:
                check_finished_stage(sft_dir, "sft", cfg.sft)
            except ValueError as e:
                raise ValueError(f"{sft_dir} (the SFT model this command trains and reuses) was made with other "
                                 f"settings: {e}") from None
        cfg.rm.sft_model = str(sft_dir / "model")
    _summary(train_rm(cfg.rm, args.output_dir, resume=args.resume, overwrite=args.overwrite,
                      reference_data=cfg.sft.data, policy_temperature=cfg.ppo.generation.temperature), args.output_dir)
    return 0


@command("ppo", help="PPO on the hybrid engine and DeepSpeed", description="""
    PPO (config section `ppo`): rollouts on the live policy weights, reward model (ppo.reward.model_path)
    or reward function (ppo.reward.function = package.module:function), fused log-probs / KL / GAE /
    whitening, clipped policy and value losses on DeepSpeed engines. The policy starts from
    ppo.policy.path (an SFT output). Presets reproduce the papers: lm_human_preferences, tldr,
    ppo_max. Writes DIR/metrics.jsonl (TRL / N-details metric names), DIR/tensorboard,
    DIR/checkpoints, DIR/model and DIR/plots/*.png.""")
def run_ppo(cfg: C.RunConfig, args: argparse.Namespace) -> int:
    from rlhf_fast.trainers.ppo import PPOTrainer

    _summary(PPOTrainer(cfg.ppo, args.output_dir, resume=args.resume, overwrite=args.overwrite).fit(), args.output_dir)
    return 0


@command("pipeline", help="the main job: SFT -> reward model -> PPO, then a summary", section="", description="""
    SFT, reward-model training and PPO in one run (sections `sft`, `rm`, `ppo`), on the built-in
    task when no data is given (nothing is downloaded). Writes DIR/sft, DIR/rm, DIR/ppo (each with
    metrics.jsonl, tensorboard/, checkpoints/, model/), DIR/ppo/plots/*.png (gold score, reward-model
    score and KL over PPO iterations) and DIR/summary.json (sft_gold_score, ppo_gold_score,
    final_kl, seconds, ...), and prints a summary table. --resume skips finished stages (refusing
    any whose settings changed) and resumes the interrupted one.""")
def run_pipeline(cfg: C.RunConfig, args: argparse.Namespace) -> int:
    from rlhf_fast.trainers.pipeline import run_pipeline as _run

    _run(cfg, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    return 0


@command("config", help="print the resolved config (YAML) or every field's documentation", section="", trains=False,
         description="Prints the config that --config / --preset / overrides resolve to, as YAML; "
         "with --docs, every field with its default and documentation.")
def run_config(cfg: C.RunConfig, args: argparse.Namespace) -> int:
    if args.docs:  # the resolved values (presets, --config, overrides), the default where they differ
        defaults = {path: value for path, value, _ in C.describe()}
        for path, value, doc in C.describe(cfg):
            note = f"   (default: {defaults[path]!r})" if value != defaults[path] else ""
            print(f"{path} = {value!r}{note}\n    {doc}")
    else:
        print(C.dump_yaml(cfg), end="")
    return 0


# ---- parsing -------------------------------------------------------------------------------------------

_EPILOG = """\
overrides:
  Any config field as --<section>.<field> VALUE or --<section>.<field>=VALUE, e.g.
  --rm.optim.lr 3e-6, --sft.deepspeed.zero_stage 2. The sub-section may be left out when the
  field name is unique in the stage (--rm.lr, --sft.zero_stage), and inside a stage's command
  the stage too (rlhf-fast sft --lr 1e-4). Order: defaults < --config file < --preset(s) <
  overrides. `rlhf-fast config --docs` lists every field.

presets: {presets}

multi-process: torchrun --nproc_per_node N -m rlhf_fast.cli <command> ... (or the deepspeed
launcher); NCCL on GPUs, gloo on CPU. A plain single process needs no launcher.
"""


def build_parser() -> argparse.ArgumentParser:
    epilog = _EPILOG.format(presets=", ".join(sorted(C.PRESETS)))
    parser = argparse.ArgumentParser(
        prog="rlhf-fast", description="RLHF with PPO on DeepSpeed: SFT, reward-model training, PPO, and the whole pipeline.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        p.add_argument("--config", metavar="FILE", help="YAML file with sections (sft:, rm:, ...)")
        p.add_argument("--preset", action="append", default=[], metavar="NAME",
                       help=f"named set of overrides, repeatable ({', '.join(sorted(C.PRESETS))})")
        p.add_argument("--task", default=None, metavar="NAME",
                       help="a built-in task (tiny_sentiment, tiny_arithmetic, tiny_calculator): its preset, applied before --preset")
        if cmd.trains:
            default = Path("runs/pipeline") if cmd.name == "pipeline" else None  # the main job needs no argument
            p.add_argument("--output-dir", required=default is None, default=default, type=Path, metavar="DIR",
                           help="where metrics.jsonl, tensorboard/, checkpoints/ and model/ go"
                           + (f" (default: {default})" if default else ""))
            p.add_argument("--resume", action="store_true",
                           help="continue the run in DIR from its newest checkpoint, with the same settings (a DIR "
                           "without a run starts a new one, saying so)")
            p.add_argument("--overwrite", action="store_true",
                           help="delete the previous run in DIR (checkpoints, metrics, TensorBoard events, samples, "
                           "model) and start a new one; without it a DIR holding a run is refused")
        if cmd.name == "config":
            p.add_argument("--docs", action="store_true", help="list every field with its default and doc")
    return parser


def _misspelled_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--output_dir`` for ``--output-dir``: argparse would report the dashed option as missing (or
    the config as having no field ``output_dir``); name the spelling instead (``parser.error``)."""
    if not argv or argv[0] not in COMMANDS:
        return
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    known = {opt for action in sub._actions for opt in action.option_strings}
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "_" in name and "." not in name and name not in known:
            dashed = name.replace("_", "-")
            if dashed in known:
                sub.error(f"unrecognized option {name}: did you mean {dashed}? (options are spelled with dashes; "
                          "config fields, like --sft.max_steps, with underscores)")


def parse(argv: Optional[list[str]] = None) -> tuple[Command, C.RunConfig, argparse.Namespace]:
    """(command, resolved config, arguments); ValueError on a bad config."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _misspelled_options(parser, argv)
    args, extra = parser.parse_known_args(argv)
    cmd = COMMANDS[args.command]
    overrides = C.parse_overrides(extra, default_section=cmd.section or None)
    if args.task is not None:
        from rlhf_fast.tasks import TASKS

        if args.task not in TASKS:
            raise ValueError(f"--task {args.task!r}: built-in tasks are {sorted(TASKS)}")
    cfg = C.load_config(args.config, presets=([args.task] if args.task else []) + args.preset, overrides=overrides)
    out = getattr(args, "output_dir", None)
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {str(out)!r} exists and is not a directory")
    return cmd, cfg, args


def _quiet_broken_pipe() -> int:
    """stdout's reader has gone (``rlhf-fast config --docs | head``): send what is still buffered
    nowhere, so that neither this function nor the interpreter's exit prints a BrokenPipeError
    traceback (the recipe of Python's signal module documentation); 141 = 128 + SIGPIPE, as a
    command killed by the signal reports."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: Optional[list[str]] = None) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cmd, cfg, args = parse(argv)
        rc = cmd.run(cfg, args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return rc
    except ValueError as e:  # bad config, missing data: a one-line message (RLHF_FAST_DEBUG=1: traceback)
        if os.environ.get("RLHF_FAST_DEBUG"):
            raise
        print(f"rlhf-fast: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, RankLost) as e:  # a full disk (74), a dead rank (76): one line, what stands
        if os.environ.get("RLHF_FAST_DEBUG"):
            raise
        if rank0 or isinstance(e, RankLost):  # every live rank names the lost one (rank 0 may be it)
            print(f"rlhf-fast: error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_FAILED if isinstance(e, CheckpointWriteError) else EXIT_RANK_LOST
    except KeyboardInterrupt as e:  # Ctrl-C (130), SIGTERM / SIGUSR1 (75): one line saying where the run stands
        if os.environ.get("RLHF_FAST_DEBUG"):
            raise
        if rank0:
            print(f"rlhf-fast: {e}" if str(e) else "rlhf-fast: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_PREEMPTED if isinstance(e, Preempted) else EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())

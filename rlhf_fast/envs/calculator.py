"""The calculator environment of the built-in ``tiny_calculator`` task (registered as
"tiny_calculator"): multi-step arithmetic problems such as ``"17, add 12, times 3, minus 9?"``,
a calculator the model calls by ending a turn with ``<calc>expression</calc>``, and a checked
final answer.

- ``reset(prompt)``: parses the problem (ValueError naming the prompt if it is not one) and keeps
  its exact answer; no observation.
- ``step(turn)``: a turn ending with ``</calc>`` is a tool call: the expression after the turn's
  last ``<calc>`` is evaluated exactly (integers, ``+ - *``, left to right as written, no
  precedence surprises: only ``a op b`` with two integers is accepted) and the observation is the
  value's decimal text (``"?"`` for anything else); reward 0, not done. Any other turn is the
  final answer: reward 1.0 when it reads ``=N`` with N the exact answer (surrounding whitespace and
  the EOS text ignored), else 0.0; done.
"""

from __future__ import annotations

import re

from rlhf_fast.envs.protocol import StepResult, Turn
from rlhf_fast.envs.registry import ENVIRONMENTS

CALL_OPEN, CALL_CLOSE = "<calc>", "</calc>"
EOS_TEXT = "<|endoftext|>"
OPS = {"add": "+", "minus": "-", "times": "*"}
_STEP = re.compile(r"^\s*(add|minus|times)\s+(\d+)\s*$")
_CALL = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*$")
_FINAL = re.compile(r"^\s*=\s*(-?\d+)\s*$")


def problem_steps(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """(start, [(op, operand), ...]) of a prompt ``"17, add 12, times 3, minus 9?"``."""
    text = prompt.strip()
    if not text.endswith("?"):
        raise ValueError(f"not a tiny_calculator problem (must end with '?'): {prompt!r}")
    parts = [p for p in text[:-1].split(",")]
    try:
        start = int(parts[0].strip())
    except ValueError:
        raise ValueError(f"not a tiny_calculator problem (must start with a number): {prompt!r}") from None
    steps = []
    for p in parts[1:]:
        m = _STEP.match(p)
        if m is None:
            raise ValueError(f"not a tiny_calculator problem (step {p.strip()!r}): {prompt!r}")
        steps.append((OPS[m.group(1)], int(m.group(2))))
    if not steps:
        raise ValueError(f"not a tiny_calculator problem (no steps): {prompt!r}")
    return start, steps


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else (a - b if op == "-" else a * b)


def solve(prompt: str) -> int:
    """The exact answer of a problem: its steps applied left to right."""
    value, steps = problem_steps(prompt)
    for op, b in steps:
        value = apply(value, op, b)
    return value


def calculate(expression: str) -> str:
    """The calculator: ``"a op b"`` (integers, + - *) -> the exact value's text; ``"?"`` otherwise."""
    m = _CALL.match(expression)
    if m is None:
        return "?"
    return str(apply(int(m.group(1)), m.group(2), int(m.group(3))))


def final_answer(text: str):
    """The integer of a final turn ``"=N"`` (EOS text and whitespace ignored), or None."""
    m = _FINAL.match(text.replace(EOS_TEXT, ""))
    return int(m.group(1)) if m else None


@ENVIRONMENTS.register("tiny_calculator")
class CalculatorEnv:
    """One episode of a tiny_calculator problem (module docstring)."""

    def __init__(self):
        self.answer = None
        self.calls = 0

    def reset(self, prompt: str):
        self.answer, self.calls = solve(prompt), 0
        return None

    def step(self, turn: Turn) -> StepResult:
        if self.answer is None:
            raise ValueError("CalculatorEnv.step before reset")
        text = turn.text.replace(EOS_TEXT, "")
        if turn.stopped and text.endswith(CALL_CLOSE) and CALL_OPEN in text:
            self.calls += 1
            expr = text[text.rindex(CALL_OPEN) + len(CALL_OPEN) : -len(CALL_CLOSE)]
            return StepResult(calculate(expr), 0.0, False)
        return StepResult(None, 1.0 if final_answer(text) == self.answer else 0.0, True)

"""Parity tooling: slow twins the fast trainer is held to, never run by a stage.

``ppo_reference`` (one PPO iteration in float64, written the plain way: the oracle of
``tests/test_ppo_parity.py``) and ``preset_vs_upstream`` (the ``lm_human_preferences`` preset's
update against a re-derivation of upstream's: ``tests/test_preset_parity.py``,
``scripts/check_preset_parity.py``). Docs: docs/architecture.md, "Stages".
"""

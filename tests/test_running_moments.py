"""RunningMoments (PPO-max running score normalisation): merged batch moments equal the moments
of all the data; normalisation; checkpoint round trip; the ppo_max preset turns it on."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from rlhf_fast.algos import PRESETS, RunningMoments


def test_hand_computed():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 3.0]))  # mean 2, m2 2
    rm.update(torch.tensor([5.0]))  # all: [1, 3, 5] -> mean 3, population var 8/3
    assert rm.count == 3 and math.isclose(rm.mean, 3.0) and math.isclose(rm.std, math.sqrt(8 / 3))
    torch.testing.assert_close(rm.normalize(torch.tensor([3.0, 5.0])),
                               torch.tensor([0.0, 2 / math.sqrt(8 / 3)]), rtol=1e-6, atol=1e-6)


@given(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=20), min_size=1, max_size=6))
def test_merged_batches_equal_all_data(batches):
    rm = RunningMoments()
    for b in batches:
        rm.update(torch.tensor(b, dtype=torch.float64))
    data = torch.tensor([x for b in batches for x in b], dtype=torch.float64)
    assert rm.count == data.numel()
    if data.numel():
        assert math.isclose(rm.mean, float(data.mean()), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(rm.std, float(data.var(unbiased=False).sqrt()), rel_tol=1e-7, abs_tol=1e-7)


def test_state_dict_round_trip_and_preset():
    rm = RunningMoments()
    rm.update(torch.randn(10))
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other.state_dict() == rm.state_dict()
    assert PRESETS["ppo_max"].normalize_scores and not PRESETS["tldr"].normalize_scores

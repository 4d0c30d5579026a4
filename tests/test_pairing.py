import pytest
import torch

from pso.config.schema import PairingConfig
from pso.pairing import normalize_scores, pairs_in_group, pairs_in_groups


def test_best_vs_worst():
    assert pairs_in_group(torch.tensor([0.2, 0.9, 0.1, 0.5]), PairingConfig()) == [(1, 2)]


def test_ties_give_no_pair():
    assert pairs_in_group(torch.tensor([0.5, 0.5]), PairingConfig()) == []
    assert pairs_in_group(torch.tensor([0.5, 0.5, 0.5]), PairingConfig(strategy="all-pairs")) == []
    assert pairs_in_group(torch.tensor([0.5, 0.5]), PairingConfig(normalize="zscore")) == []


def test_all_pairs_above_margin():
    scores = torch.tensor([0.0, 1.0, 0.5, 0.95])
    pairs = pairs_in_group(scores, PairingConfig(strategy="all-pairs", margin=0.2))
    assert sorted(pairs) == [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]


def test_margin_applies_to_best_vs_worst():
    assert pairs_in_group(torch.tensor([0.0, 0.1]), PairingConfig(margin=0.2)) == []


def test_zscore_normalisation_per_group():
    s = normalize_scores(torch.tensor([1.0, 2.0, 3.0]), "zscore")
    torch.testing.assert_close(s.mean(), torch.tensor(0.0))
    torch.testing.assert_close(s.std(unbiased=False), torch.tensor(1.0))
    # with a margin in normalised units, a group's scale does not matter
    cfg = PairingConfig(strategy="all-pairs", normalize="zscore", margin=1.0)
    assert pairs_in_group(torch.tensor([1.0, 2.0, 3.0]), cfg) == pairs_in_group(torch.tensor([10.0, 20.0, 30.0]), cfg)


def test_groups_give_global_indices():
    scores = torch.tensor([0.1, 0.9, 0.7, 0.7, 0.3, 0.2])
    assert pairs_in_groups(scores, 2, PairingConfig()) == [(1, 0), (4, 5)]


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        pairs_in_group(torch.tensor([1.0]), PairingConfig())
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        pairs_in_groups(torch.tensor([1.0, 2.0, 3.0]), 2, PairingConfig())
    with pytest.raises(ValueError, match="finite"):
        pairs_in_group(torch.tensor([1.0, float("nan")]), PairingConfig())

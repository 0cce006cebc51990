import re

import pytest

import prune
from prune import PruneError
from conftest import scores_from as fake_scores


def angular_from_steps(steps):
    """angular[i][j] = sum of per-block steps between states i and j (a metric on a line)."""
    m = len(steps) + 1
    return [[abs(sum(steps[min(i, j):max(i, j)])) for j in range(m)] for i in range(m)]


def test_one_shot_bi_takes_lowest_and_protects_first_and_last():
    s = fake_scores([0.01, 0.5, 0.2, 0.1, 0.3, 0.05])
    assert prune.select(s, 2, metric="bi").removed == [2, 3]  # 0 and 5 protected
    assert prune.select(s, 2, metric="bi", protect=[]).removed == [0, 5]
    assert prune.select(s, 3, metric="bi", protect=[3]).removed == [0, 2, 5]


def test_contiguous_picks_smallest_angular_run():
    steps = [0.3, 0.2, 0.05, 0.04, 0.06, 0.2, 0.3]
    s = fake_scores([0.1] * 7, angular=angular_from_steps(steps))
    sel = prune.select(s, 3, strategy="contiguous")
    assert sel.removed == [2, 3, 4]
    assert sel.details["distance"] == pytest.approx(0.15)
    assert sel.kept == [0, 1, 5, 6]


def test_fraction_and_counts():
    s = fake_scores([0.1 * i for i in range(1, 9)])
    assert len(prune.select(s, fraction=0.25, metric="bi").removed) == 2
    with pytest.raises(PruneError, match="strictly between 0 and 1"):
        prune.select(s, fraction=1.0, metric="bi")
    with pytest.raises(PruneError, match="at least one must stay"):
        prune.select(s, 8, metric="bi")
    with pytest.raises(PruneError, match="only 6 of 8 are not protected"):
        prune.select(s, 7, metric="bi")
    with pytest.raises(PruneError, match="at least 1"):
        prune.select(s, 0, metric="bi")
    with pytest.raises(PruneError, match="out of range"):
        prune.select(s, 2, metric="bi", protect=[9])
    with pytest.raises(PruneError, match="unknown metric"):
        prune.select(s, 2, metric="loss")
    with pytest.raises(PruneError, match="unknown strategy"):
        prune.select(s, 2, strategy="magic")
    # a fraction is named as the setting to change (the messages blamed select.n_layers, which was not given)
    with pytest.raises(PruneError, match=r"select.fraction=0.05 of 8 blocks rounds to 0: .*\(raise select.fraction\)"):
        prune.select(s, fraction=0.05, metric="bi")
    with pytest.raises(PruneError, match=r"rounds to 8: cannot remove 8 of 8 blocks: .*\(lower select.fraction\)"):
        prune.select(s, fraction=0.95, metric="bi", protect=[])


def test_msrs_ranks_by_contribution_with_cka_tie_break():
    L = 5
    cka = [[1.0] * (L + 1) for _ in range(L + 1)]
    # block outputs 1..3 all saturate the soft count; block 2 is the most similar on average
    S = [[1.0, 0.1, 0.1, 0.1, 0.1],
         [0.1, 1.0, 0.95, 0.9, 0.1],
         [0.1, 0.95, 1.0, 0.97, 0.1],
         [0.1, 0.9, 0.97, 1.0, 0.1],
         [0.1, 0.1, 0.1, 0.1, 1.0]]
    for i in range(L):
        for j in range(L):
            cka[i + 1][j + 1] = S[i][j]
    import torch

    from prune.core.metrics import msrs

    m = msrs(torch.tensor(S)).to_dict()
    s = fake_scores([0.1] * L, cka=cka, msrs=m)
    assert prune.select(s, 1, metric="msrs").removed == [2]
    assert prune.select(s, 3, metric="msrs", protect=[]).removed == [1, 2, 3]
    # blocks 1 and 3 tie on contribution: the higher mean CKA to the others (3: 2.07 against 2.05) goes first
    assert s.msrs_contribution[1] == pytest.approx(s.msrs_contribution[3])
    assert prune.select(s, 2, metric="msrs", protect=[]).removed == [2, 3]


def test_msrs_takes_the_identities_of_a_family_whose_cka_rows_agree():
    """Blocks 3 and 4 copy their input (an identity's output is its predecessor's): blocks 2, 3 and 4 have one CKA
    row, the same contribution and mean CKA, and the index chose the real block 2 first. BI tells them apart."""
    import torch

    from prune.core.metrics import msrs

    L = 6
    S = [[1.0 if i == j else 0.1 for j in range(L)] for i in range(L)]
    for i in (2, 3, 4):
        for j in (2, 3, 4):
            S[i][j] = 1.0
    cka = [[1.0] * (L + 1) for _ in range(L + 1)]
    for i in range(L):
        for j in range(L):
            cka[i + 1][j + 1] = S[i][j]
    s = fake_scores([0.3, 0.2, 0.25, 0.0, 0.0, 0.2], cka=cka, msrs=msrs(torch.tensor(S)).to_dict())
    assert s.msrs_contribution[2] == pytest.approx(s.msrs_contribution[3]) == pytest.approx(s.msrs_contribution[4])
    assert prune.select(s, 2, metric="msrs", protect=[]).removed == [3, 4]


def test_a_block_scored_nan_is_ranked_last():
    """A NaN score (an overflowing block) is never the most removable by the ordering of NaN in a sort."""
    from prune.choose.rules import rank_blocks

    nan = float("nan")
    s = fake_scores([0.5, nan, 0.1, 0.3, nan, 0.2])
    assert rank_blocks(s, "bi") == [2, 5, 3, 0, 1, 4]
    assert prune.select(s, 3, metric="bi", protect=[]).removed == [2, 3, 5]


def test_tail_and_random_baselines():
    s = fake_scores([0.1] * 10)
    assert prune.select(s, 3, strategy="tail").removed == [6, 7, 8]
    assert prune.select(s, 3, strategy="tail", protect=[]).removed == [6, 7, 8]  # the blocks before the last, always
    a = prune.select(s, 3, strategy="random", seed=1)
    assert a.removed == prune.select(s, 3, strategy="random", seed=1).removed
    assert 0 not in a.removed and 9 not in a.removed
    assert any(prune.select(s, 3, strategy="random", seed=k).removed != a.removed for k in range(2, 6))


def test_a_metric_the_strategy_does_not_read_is_refused_not_dropped():
    s = fake_scores([0.1] * 10, angular=angular_from_steps([3, 1, 2, 1, 1, 1, 2, 3, 3, 3]))
    assert prune.select(s, 3, strategy="contiguous", metric="angular").removed == prune.select(s, 3, strategy="contiguous").removed
    for strategy, metric in (("contiguous", "bi"), ("tail", "angular"), ("random", "bi")):
        with pytest.raises(PruneError, match=f"metric '{metric}' is read only by strategy one_shot here; {strategy}"):
            prune.select(s, 3, strategy=strategy, metric=metric)
    for wrong in (s.to_dict(), None):
        with pytest.raises(PruneError, match="select: scores must be what prune.score returns"):
            prune.select(wrong, 3)


def test_block_numbers_of_any_integer_type_and_a_single_protected_block():
    """protect=0 protected nothing (read as "no list") and protect=-1 failed with a TypeError; numpy integers
    were refused by remove_layers but leaked into a Selection that json could not write; floats and
    booleans are never block numbers."""
    import json

    import numpy as np

    from prune.choose.rules import resolve_protect

    steps = [0.3, 0.2, 0.05, 0.04, 0.06, 0.2, 0.3, 0.1]
    scores = fake_scores([0.5, 0.4, 0.1, 0.05, 0.06, 0.3, 0.2, 0.01], angular=angular_from_steps(steps))
    assert resolve_protect(0, 8) == [0] and resolve_protect(-1, 8) == [7] and resolve_protect(None, 8) == []
    assert 7 not in prune.select(scores, 2, protect=-1, metric="bi").removed
    low_first = fake_scores([0.01, 0.4, 0.1, 0.05, 0.06, 0.3, 0.2, 0.5])  # block 0 the lowest BI
    assert prune.select(low_first, 2, protect=None, metric="bi").removed == [0, 3]
    assert prune.select(low_first, 2, protect=0, metric="bi").removed == [3, 4]  # 0 protected, not "no list"
    chosen = prune.select(scores, np.int64(2), strategy="contiguous", protect=[np.int64(0), -1])
    assert json.loads(json.dumps(chosen.to_dict()))["removed"] == chosen.removed
    assert all(type(i) is int for i in chosen.removed)
    from conftest import build_model

    model = build_model("llama")
    prune.remove_layers(model, [np.int64(3)])
    assert len(model.model.layers) == 7
    for bad, said in (([1.0], "block index 1.0 is not an integer"), ([True], "block index True is not an integer"),
                      (3, "block indices 3: give a list of integers"), ("3", "block indices '3': give a list")):
        with pytest.raises(PruneError, match=re.escape(said)):
            prune.remove_layers(build_model("llama"), bad)
    with pytest.raises(PruneError, match="select.n_layers 2.0 is not an integer"):
        prune.select(scores, 2.0)

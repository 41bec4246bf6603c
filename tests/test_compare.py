import numpy as np
import pytest

from irmprobe.compare import agreement, kendall_tau, paired


def test_kendall_tau_pairs_values_by_token_hand_computed():
    irm = {1: 0.1, 2: 0.4, 3: 0.2, 4: 0.9, 7: 5.0}
    rm = {4: 2.0, 2: 1.0, 1: -1.0, 3: 1.5, 5: 9.0}
    ids, a, b = paired(irm, rm)
    assert ids.tolist() == [1, 2, 3, 4]
    # Pairs (i<j): (1,2) C, (1,3) C, (1,4) C, (2,3) D, (2,4) C, (3,4) C -> tau = (5-1)/6.
    tau, p = kendall_tau(a, b)
    assert tau == pytest.approx(4 / 6)
    assert 0 < p < 1
    # Sorting each list by value independently (the research code's defect) would give tau = 1.
    assert kendall_tau(np.sort(a), np.sort(b))[0] == pytest.approx(1.0)


def test_sign_accuracy_against_neutral_point():
    # Neutral point = median of all IRM values = 0.0 (tokens 10, 11, 12 are neutral).
    irm = {1: 1.0, 2: -0.5, 3: -2.0, 4: 0.5, 10: 0.0, 11: 0.0, 12: 0.0}
    rm = {1: 2.0, 2: 1.0, 3: -1.0, 4: -3.0}
    row = agreement("view", irm, rm)
    assert row.neutral_point == 0.0
    assert row.sign_acc_pos == pytest.approx(0.5)   # token 1 right, token 2 wrong
    assert row.sign_acc_neg == pytest.approx(0.5)   # token 3 right, token 4 wrong
    assert (row.n_pos, row.n_neg, row.n_tokens) == (2, 2, 4)


def test_identically_zero_irm_reports_no_tau():
    row = agreement("null", {1: 0.0, 2: 0.0, 3: 0.0}, {1: 1.0, 2: -1.0, 3: 2.0})
    assert row.is_zero and row.tau is None and row.p_value is None


def test_too_few_tokens_give_a_note_not_a_figure():
    row = agreement("v", {1: 0.3, 2: 0.1}, {1: 1.0})
    assert row.tau is None and "only 1 RM token(s)" in row.note
    with pytest.raises(ValueError, match="paired by token"):
        kendall_tau(np.ones(3), np.ones(2))

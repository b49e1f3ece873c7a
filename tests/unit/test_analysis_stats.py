"""checkfree.analysis.stats on known numbers: the t interval against a hand computation, Holm on a textbook
example, BCa against the percentile bootstrap where the data are symmetric, and the verdict rule."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from checkfree.analysis import stats as st

T975_DF4 = 2.7764451051977987  # Student t, 97.5% quantile, 4 degrees of freedom (tables: 2.776)
T975_DF2 = 4.302652729749464  # ... 2 degrees of freedom (tables: 4.303)


def test_t_interval_matches_the_hand_computation():
    iv = st.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # sd of 1..5 is sqrt(2.5)
    assert (iv.estimate, iv.n) == (3.0, 5)
    assert iv.low == pytest.approx(3.0 - half) and iv.high == pytest.approx(3.0 + half)
    assert iv.low == pytest.approx(1.0368, abs=1e-4)


def test_ratio_t_is_a_t_interval_on_the_log_ratios():
    iv = st.ratio_t([2.0, 4.0, 8.0], [1.0, 1.0, 1.0])  # logs: ln2, 2 ln2, 3 ln2; sd ln2
    half = T975_DF2 * math.log(2) / math.sqrt(3)
    assert iv.estimate == pytest.approx(4.0)
    assert iv.low == pytest.approx(math.exp(2 * math.log(2) - half))
    assert iv.high == pytest.approx(math.exp(2 * math.log(2) + half))
    assert iv.low == pytest.approx(0.7149, abs=1e-4)


def test_ratio_pairs_skip_seeds_where_either_side_is_missing():
    assert st.log_ratios([2.0, None, 3.0], [1.0, 1.0, None]) == [pytest.approx(math.log(2))]
    assert st.paired_ratio([2.0, None], [1.0, 1.0]).n == 1


def test_t_pvalue_matches_scipy():
    x = [0.3, -0.1, 0.4, 0.2, 0.25]
    assert st.t_pvalue(x) == pytest.approx(sps.ttest_1samp(x, 0.0).pvalue)
    assert st.t_pvalue([0.5]) == 1.0


def test_holm_on_a_textbook_example():
    # m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert st.holm([]) == []


def test_bca_agrees_with_the_percentile_bootstrap_on_symmetric_data():
    x = np.linspace(-1.0, 1.0, 41)  # symmetric about its mean: no bias, no skew to correct
    b = st.bca(x)
    p = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=9999, rng=np.random.default_rng(0))
    width = p.confidence_interval.high - p.confidence_interval.low
    assert b.method == "BCa" and b.estimate == pytest.approx(0.0, abs=1e-12)
    assert b.low == pytest.approx(p.confidence_interval.low, abs=0.05 * width)
    assert b.high == pytest.approx(p.confidence_interval.high, abs=0.05 * width)


def test_bca_without_a_spread_gives_no_interval():
    iv = st.bca([2.0, 2.0, 2.0])
    assert (iv.low, iv.high, iv.n) == (2.0, 2.0, 3)
    assert st.bca([1.0, 2.0]).low == 1.5  # fewer than MIN_SEEDS


def test_welch_matches_scipy_for_unpaired_arms():
    a, b = [1.0, 1.2, 0.9, 1.1, 1.3], [1.5, 1.4, 1.8, 1.6, 1.7]
    c = st.Comparison("x", a, b, kind="difference", paired=False)
    c.compute()
    assert c.p == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert c.t.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert c.t.high < 0 and c.bca.high < 0


def test_judge_needs_the_t_interval_bca_and_holm():
    clear = st.Comparison("clear", [0.5, 0.52, 0.49, 0.51, 0.5], [1.0] * 5, words=("faster", "slower"))
    noisy = st.Comparison("noisy", [0.6, 1.5, 0.7, 1.2, 0.9], [1.0] * 5)
    st.judge([clear, noisy])
    assert clear.verdict == "faster"
    assert noisy.verdict.startswith("not resolved (t interval")
    # one comparison that resolves alone but not in a family of ten: Holm multiplies its p by 10
    marginal = [0.90, 0.97, 0.85, 0.99, 0.93]
    alone = st.Comparison("m", marginal, [1.0] * 5)
    st.judge([alone])
    assert alone.verdict == "lower" and alone.p < 0.05
    family = [st.Comparison("m", marginal, [1.0] * 5)] + [
        st.Comparison(f"n{i}", [1.0, 1.1, 0.9, 1.05, 0.95], [1.0] * 5) for i in range(9)
    ]
    st.judge(family)
    assert family[0].p_holm == pytest.approx(min(1.0, 10 * alone.p))
    assert family[0].verdict.startswith("not resolved (Holm")


def test_judge_refuses_a_verdict_from_too_few_seeds():
    c = st.Comparison("two", [0.5, 0.5], [1.0, 1.0])
    st.judge([c])
    assert c.verdict.startswith("not resolved (2 seeds")


def test_a_comparison_kind_must_be_ratio_or_difference():
    with pytest.raises(ValueError, match="kind 'diff'"):
        st.Comparison("x", [1.0], [1.0], kind="diff")


def test_fmt_interval_reads_intervals_and_their_dicts():
    iv = st.Interval(1.234, 1.0, 1.5, 5)
    assert st.fmt_interval(iv) == "1.23 [1.00, 1.50]" == st.fmt_interval(iv.as_dict())
    assert st.fmt_interval({"estimate": 2.0, "low": None, "high": None, "n": 1}, 1) == "2.0 (n=1)"
    assert st.fmt_interval(st.Interval(math.nan, math.nan, math.nan, 0)) == "-"
    assert st.fmt_interval(None) == "-"


def test_as_summary_has_no_interval_from_one_value():
    assert st.as_summary(st.t_interval([0.5]))["low"] is None
    assert st.as_summary(st.t_interval([1.0, 2.0, 3.0, 4.0, 5.0]))["low"] == pytest.approx(1.0368, abs=1e-4)

"""Results that take over their state's arrays (run_fit(spend=True)): exact centers of many
classes need no (classes, features) copies; the numbers are those of result()."""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from tests.reference import make_data, ref_centers_exact


@pytest.mark.parametrize("nan_policy, weighted", [("error", False), ("omit", False), ("error", True)])
def test_spent_result_equals_the_kept_one_and_the_reference(tmp_path, nan_policy, weighted):
    x = make_data((3000, 7), "float32", seed=12)
    labels = np.random.default_rng(12).integers(0, 50, size=3000)
    labels[labels == 7] = 8  # a class never seen
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "w.npy", np.ones(3000))
    results = []
    for spend in (False, True):
        with ns.open_stream([str(tmp_path / "x.npy")]) as stream, ns.open_stream([str(tmp_path / "l.npy")]) as lab, \
                ns.open_stream([str(tmp_path / "w.npy")]) as w:
            state = ns.centers_state(50, "exact", nan_policy=nan_policy)
            side = {"labels": lab, **({"weights": w} if weighted else {})}
            results.append(ns.run_fit(state, stream, side=side, block_rows=256, spend=spend))
    kept, spent = results
    for name in kept.arrays:
        np.testing.assert_array_equal(spent.arrays[name], kept.arrays[name])
    reference = ref_centers_exact(x, labels, 50)
    centers = reference[0] if isinstance(reference, tuple) else reference
    np.testing.assert_allclose(spent.arrays["centers"], centers, rtol=1e-12, atol=1e-12)
    assert np.isnan(spent.arrays["centers"][7]).all() and spent.arrays["counts"][7] == 0


def test_a_spent_state_refuses_more_rows_and_merges():
    x = make_data((100, 3), "float64", seed=13)
    labels = np.arange(100) % 4
    state = ns.CentersExact(4).update(x, labels)
    before = state.result()
    spent = state.result(spend=True)
    np.testing.assert_array_equal(spent.arrays["var"], before.arrays["var"])
    for again in (lambda: state.update(x, labels), lambda: state.result(),
                  lambda: ns.CentersExact(4).update(x, labels).merge(state)):
        with pytest.raises(ns.UsageError, match="spent"):
            again()

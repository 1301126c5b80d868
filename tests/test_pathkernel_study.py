"""The Path Kernel study's statistics and its per-mask measurement (benchmarks/pathkernel_study.py)."""
import copy
import itertools
import math

import numpy as np
import pytest
import torch

from benchmarks import pathkernel_study as study


def test_ranks_average_ties():
    assert study.ranks([3.0, 1.0, 3.0, 2.0, 3.0]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert study.ranks([0.5]).tolist() == [1.0]


def test_spearman_matches_the_closed_form_without_ties():
    rng = np.random.default_rng(1)
    for n in (5, 12, 40):
        x, y = rng.normal(size=n), rng.normal(size=n)
        d = study.ranks(x) - study.ranks(y)
        expected = 1 - 6 * float((d * d).sum()) / (n * (n * n - 1))
        assert study.spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_is_rank_only_and_handles_ties_and_constants():
    x = np.random.default_rng(2).normal(size=20)
    assert study.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert study.spearman(x, -x ** 3) == pytest.approx(-1.0)
    # with ties: the Pearson correlation of the averaged ranks, by hand
    a, b = [1, 2, 2, 3, 5], [2, 1, 4, 4, 9]
    ra, rb = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3.5, 3.5, 5])
    assert study.spearman(a, b) == pytest.approx(float(np.corrcoef(ra, rb)[0, 1]), abs=1e-12)
    assert math.isnan(study.spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="length"):
        study.spearman([1, 2], [1, 2, 3])


def test_permutation_p_is_exact_enough_for_a_small_sample():
    # n = 5, perfect order: 2 of the 120 pairings reach |rho| = 1, so p = 1/60
    x = [0.3, 1.0, 2.5, 4.0, 9.0]
    p = study.permutation_p(x, [1, 2, 3, 4, 5], n_perm=30_000)
    assert p == pytest.approx(2 / 120, abs=0.004)
    exact = np.mean([abs(study.spearman(x, perm)) >= 1 - 1e-12 for perm in itertools.permutations(range(5))])
    assert exact == pytest.approx(2 / 120)
    rng = np.random.default_rng(3)
    assert study.permutation_p(rng.normal(size=30), rng.normal(size=30), n_perm=2000) > 0.01


def test_correlations_pool_and_split_by_density():
    runs = []
    for d, shift in ((0.1, 0.0), (0.01, 1.0)):
        for i, m in enumerate("abcd"):
            runs.append({"method": m, "density": d, "trace": 10.0 ** (i - 3 * shift), "lambda_max": float(i),
                         "train_loss_after": 1.0 + shift - 0.1 * i})
    c = study.correlations(runs)
    assert c["n"] == 8
    assert c["rho_trace_within_density"] == {"0.1": pytest.approx(-1.0), "0.01": pytest.approx(-1.0)}
    assert c["rho_trace_within_density_mean"] == pytest.approx(-1.0)
    assert c["rho_trace"] < -0.9  # denser masks have larger traces and lower losses here
    assert c["rho_density"] == pytest.approx(study.spearman([r["density"] for r in runs],
                                                            [r["train_loss_after"] for r in runs]))


def test_correlations_leave_out_non_finite_runs():
    runs = [{"density": 0.1, "trace": float(i), "lambda_max": float(i), "train_loss_after": 2.0 - 0.1 * i}
            for i in range(6)]
    runs.append({"density": 0.1, "trace": 3.5, "lambda_max": 3.5, "train_loss_after": float("nan")})
    c = study.correlations(runs)
    assert c["n"] == 6 and c["left_out_non_finite"] == 1
    assert c["rho_trace"] == pytest.approx(-1.0)


def test_study_one_measures_the_masked_network_and_leaves_the_model_alone():
    from ntkfast import data as D
    from ntkfast import models, pathkernel

    torch.manual_seed(0)
    model = models.get("lenet300_100")
    before = copy.deepcopy(model.state_dict())
    train_set = D.GaussianNoise((1, 28, 28), n=256, seed=1)
    labelled = study.labelled_batch(train_set, 64, 0)
    r = study.study_one(model, "snip", 0.05, train_set, train_set, labelled=labelled, max_batches=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    import ntkfast

    masks = ntkfast.prune(model, "snip", 0.05, data=labelled, progress=False)
    assert r["kept"] == masks.kept
    assert r["trace"] == pytest.approx(pathkernel.trace(model, masks, dtype=torch.float64), rel=1e-12)
    assert r["lambda_max"] == pytest.approx(float(pathkernel.spectrum(model, masks, k=1)[0]), rel=1e-9)
    assert 0 < r["lambda_max"] <= r["trace"]
    assert math.isfinite(r["train_loss_after"]) and r["train_loss_after"] > 0
    assert 0.0 <= r["train_accuracy_after"] <= 1.0

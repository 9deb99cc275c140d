from __future__ import annotations

import torch

from lowmem_bonsai.method.masks import eligible_units, sample_masks
from lowmem_bonsai.method.regression import fit, kendall_tau


def planted(seed: int, d: int = 120, m: int = 96, noise: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    true = torch.rand(d, generator=g, dtype=torch.float64)
    true[torch.randperm(d, generator=g)[:10]] = 0.0  # ten units that do not matter at all
    x = sample_masks(torch.rand(d, generator=g), torch.arange(d), n_units=d, n_masks=m, gen=g)
    y = x.double() @ true + noise * torch.randn(m, generator=g, dtype=torch.float64)
    return g, true, x, y


def test_ridge_and_lasso_recover_planted_importance_without_prior():
    for estimator in ("ridge", "lasso"):
        # 96 masks are 48 antithetic pairs: fewer independent samples than that many features
        g, true, x, y = planted(0, d=40, m=96)
        f = fit(x, y, prior=torch.zeros(40, dtype=torch.float64), kinds=torch.zeros(40, dtype=torch.long),
                estimator=estimator, gen=g)
        assert kendall_tau(f.beta, true) > 0.85, estimator
        assert f.cv_tau > 0.85
        # the ten planted useless units are (nearly) the lowest coefficients
        lowest = set(torch.argsort(f.beta)[:12].tolist())
        assert len(lowest & set((true == 0).nonzero().flatten().tolist())) >= 9


def test_informative_prior_helps_when_features_outnumber_samples():
    g, true, x, y = planted(1, d=400, m=32)
    prior = true + 0.3 * torch.rand(400, generator=g, dtype=torch.float64)
    kinds = torch.zeros(400, dtype=torch.long)
    with_prior = fit(x, y, prior=prior, kinds=kinds, gen=g)
    without = fit(x, y, prior=torch.zeros(400, dtype=torch.float64), kinds=kinds, gen=g)
    assert kendall_tau(with_prior.beta, true) > kendall_tau(without.beta, true) + 0.1


def test_masks_are_antithetic_within_the_eligible_set():
    g = torch.Generator().manual_seed(2)
    prior = torch.rand(50, generator=g)
    elig = eligible_units(prior, n_eligible=10)
    assert set(elig.tolist()) == set(torch.argsort(prior)[:10].tolist())
    masks = sample_masks(prior, elig, n_units=50, n_masks=8, gen=g)
    outside = torch.ones(50, dtype=torch.bool)
    outside[elig] = False
    assert (masks[:, outside] == 1).all()
    for i in range(0, 8, 2):
        assert (masks[i, elig] + masks[i + 1, elig] == 1).all()  # each pair splits the eligible set
        assert masks[i, elig].sum() == 5


def test_varied_masks_stay_antithetic_and_vary_the_count():
    g = torch.Generator().manual_seed(3)
    prior = torch.rand(50, generator=g)
    elig = eligible_units(prior, n_eligible=10)
    masks = sample_masks(prior, elig, n_units=50, n_masks=40, gen=g, varied=True)
    counts = (1 - masks[0::2, elig]).sum(1)
    assert len(set(counts.tolist())) >= 5  # not always half
    assert ((masks[0::2, elig] + masks[1::2, elig]) == 1).all()


def test_module_scales_recover_a_sensitive_module():
    """Two modules with the same prior, one 5x as important; 400 units, 32 masks.

    Per-unit corrections cannot be estimated from so few masks; one scale per module can.
    """
    g = torch.Generator().manual_seed(4)
    d, m, h = 400, 32, 200
    prior = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    groups = torch.arange(d) // h
    true = prior * torch.where(groups == 0, 5.0, 1.0)
    x = torch.cat([sample_masks(prior[:h].float(), torch.arange(h), n_units=h, n_masks=m, gen=g,
                                varied=True),
                   sample_masks(prior[h:].float(), torch.arange(h), n_units=h, n_masks=m, gen=g,
                                varied=True)], 1)
    y = x.double() @ true + 0.01 * torch.randn(m, generator=g, dtype=torch.float64)
    kinds = torch.zeros(d, dtype=torch.long)
    with_groups = fit(x, y, prior=prior, kinds=kinds, gen=g, groups=groups)
    without = fit(x, y, prior=prior, kinds=kinds, gen=g)
    assert with_groups.module_penalty != float("inf")
    assert with_groups.cv_tau > without.cv_tau
    ratio = with_groups.beta[:h].sum() / with_groups.beta[h:].sum()
    assert 3.5 < float(ratio) < 6.5

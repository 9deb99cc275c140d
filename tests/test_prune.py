from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.cli import app
from lowmem_bonsai.evaluate import evaluate
from lowmem_bonsai.engine.forward import streamed_nll
from lowmem_bonsai.pipeline import prune_model
from lowmem_bonsai.model.plan import Plan
from lowmem_bonsai.profiles import load_profile

from .conftest import hf_nll, make_tiny, write_word_tokenizer, zero_removed

TINY = dict(layers=4, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)


@pytest.fixture
def tiny(tmp_path, sample_text):
    model_dir = tmp_path / "m"
    model = make_tiny(model_dir, "llama-gqa-tied", **TINY)
    write_word_tokenizer(model_dir, sample_text.read_text())
    return model, model_dir


def profile(**kw):
    """The default profile, small; without reconstruction, so that the pruned weights are the
    source's (the tests compare with transformers whose removed units are zeroed)."""
    base = dict(seq_len=32, calib_seqs=4, masks_per_round=16, align=8, prune_frac=0.1, reconstruct="none")
    return load_profile(None).replace(**{**base, **kw})


def test_bonsai_prunes_to_target_and_pruned_model_equals_dense_with_units_removed(tmp_path, tiny,
                                                                                   sample_text):
    model, model_dir = tiny
    out = tmp_path / "out"
    report = prune_model(model_dir=model_dir, out_dir=out, sparsity=0.5, profile=profile(),
                         calib=sample_text, seed=3)
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.02
    for name in ("config.json", "model.safetensors", "tokenizer.json", "plan.json", "report.json",
                 "pruning.png"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    plan = Plan.load(out / "plan.json")
    assert cfg["intermediate_size_per_layer"] == [len(lp.channels) for lp in plan.layers]
    assert all(len(lp.channels) % 8 == 0 for lp in plan.layers)
    # 10% per round; narrow attention modules may round to 0 units, leaving more rounds to the MLPs
    assert 5 <= len(report["rounds"]) <= 10 and all(r["masks"] == 16 for r in report["rounds"])

    # The written shards, read back, give the dense model's NLL with the pruned units zeroed.
    tokens = torch.randint(0, 211, (2, 20), generator=torch.Generator().manual_seed(0))
    pruned = streamed_nll(Checkpoint(out), tokens)[0]
    zero_removed(model, plan, head_dim=16)
    torch.testing.assert_close(pruned, hf_nll(model, tokens), rtol=1e-4, atol=0)

    ev = evaluate(model_dir=out, data=sample_text, seq_len=32, max_seqs=4)
    assert ev.perplexity > 1


def test_same_seed_same_plan_other_seed_other_plan(tmp_path, tiny, sample_text):
    _, model_dir = tiny
    plans = []
    for i, seed in enumerate((5, 5, 6)):
        prune_model(model_dir=model_dir, out_dir=tmp_path / f"o{i}", sparsity=0.3, profile=profile(),
                    calib=sample_text, seed=seed)
        plans.append(Plan.load(tmp_path / f"o{i}" / "plan.json").layers)
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]


@pytest.mark.parametrize("counts,eligible", [("fixed", "module"), ("varied", "module"), ("varied", "global")])
def test_global_allocation_reaches_the_target(tmp_path, tiny, sample_text, counts, eligible):
    _, model_dir = tiny
    report = prune_model(model_dir=model_dir, out_dir=tmp_path / "o", sparsity=0.5,
                         profile=profile(allocation="global", mask_counts=counts, eligible=eligible),
                         calib=sample_text)
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.02
    assert report["settings"]["profile"]["allocation"] == "global"
    assert report["settings"]["profile"]["eligible"] == eligible
    assert all(l["channels"] % 8 == 0 for l in report["layers"])


@pytest.mark.parametrize("method", ["bonsai", "prior"])
def test_query_head_units_keep_equal_groups_and_equal_transformers(tmp_path, sample_text, method):
    model_dir = tmp_path / "m"
    # 4 query heads per KV group, so query-head slots are worth pruning
    model = make_tiny(model_dir, "llama-gqa-tied", layers=3, intermediate_size=256,
                      num_attention_heads=8, num_key_value_heads=2)
    write_word_tokenizer(model_dir, sample_text.read_text())
    out = tmp_path / "o"
    report = prune_model(model_dir=model_dir, out_dir=out, sparsity=0.4, method=method,
                         profile=profile(head_unit="query", prune_frac=0.2), calib=sample_text)
    assert abs(report["achieved_sparsity"] - 0.4) <= 0.02
    plan = Plan.load(out / "plan.json")
    assert any(len(lp.heads) < 8 for lp in plan.layers)  # some query heads went
    for lp in plan.layers:
        assert lp.kv_heads == (0, 1)  # no KV group is removed in this mode
        per_group = [sum(1 for h in lp.heads if h // 4 == g) for g in lp.kv_heads]
        assert len(set(per_group)) == 1 and per_group[0] >= 1
    tokens = torch.randint(0, 211, (2, 20), generator=torch.Generator().manual_seed(0))
    pruned = streamed_nll(Checkpoint(out), tokens)[0]
    zero_removed(model, plan, head_dim=16)
    torch.testing.assert_close(pruned, hf_nll(model, tokens), rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["prior", "magnitude", "random"])
def test_baselines_reach_the_target(tmp_path, tiny, sample_text, method):
    _, model_dir = tiny
    report = prune_model(model_dir=model_dir, out_dir=tmp_path / "o", sparsity=0.5, profile=profile(),
                         calib=sample_text, method=method)
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.02
    assert all(r["masks"] == 0 for r in report["rounds"])


def test_cli_prune_and_its_refusals(tmp_path, tiny, sample_text):
    _, model_dir = tiny
    runner = CliRunner()
    args = ["prune", str(model_dir), "--calib", str(sample_text), "--seq-len", "32", "--calib-seqs", "2",
            "--masks-per-round", "8", "--prune-frac", "0.25"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--sparsity", "0.25"])
    assert res.exit_code == 0, res.output
    assert "sparsity 0.2" in res.output
    for extra, words in [(["--out", str(tmp_path / "o"), "--sparsity", "0.3"], "not empty"),
                         (["--out", str(tmp_path / "p"), "--sparsity", "1.5"], "between 0 and 1"),
                         (["--out", str(tmp_path / "p"), "--method", "nope"], "expected one of"),
                         (["--out", str(tmp_path / "p"), "--profile", "nope"], "known profiles")]:
        res = runner.invoke(app, [*args, *extra])
        assert res.exit_code == 2, res.output
        assert words in res.output
    assert not (tmp_path / "p").exists()


def test_coarse_modules_are_neither_perturbed_nor_pruned():
    """3 KV groups at p = 0.1: round(0.3) = 0 groups would go, so the masks leave them alone too."""
    from lowmem_bonsai.method.masks import Module
    from lowmem_bonsai.method.prune import sample_round

    g = torch.Generator().manual_seed(0)
    mods = [Module(0, "attn", 3, 1000, 1), Module(0, "mlp", 96, 10, 8, 8), Module(1, "attn", 12, 1000, 1)]
    priors = [(torch.rand(3, generator=g).double(), torch.rand(96, generator=g).double()),
              (torch.rand(12, generator=g).double(), None)]
    rounds = sample_round(mods, priors, 0.1, 16, g)
    assert rounds[0].eligible.numel() == 0 and (rounds[0].masks == 1).all()
    assert rounds[1].eligible.numel() == 20 and (rounds[1].masks == 0).any()
    assert rounds[2].eligible.numel() == 3  # round(1.2) = 1 group may go: perturbed
    every = sample_round(mods, priors, 0.1, 16, g, skip_coarse=False)
    assert every[0].eligible.numel() == 2


def test_global_eligibility_follows_the_ranking_across_layers():
    """Units of all layers ranked together: the low-ranked layer gets the eligible units, uneven."""
    from lowmem_bonsai.method.masks import Module
    from lowmem_bonsai.method.prune import global_eligible, sample_round

    g = torch.Generator().manual_seed(0)
    mods = [Module(0, "attn", 12, 1000, 1), Module(0, "mlp", 96, 10, 8, 8),
            Module(1, "attn", 12, 1000, 1), Module(1, "mlp", 96, 10, 8, 8)]
    priors = [(torch.rand(12, generator=g).double(), torch.rand(96, generator=g).double())
              for _ in range(2)]
    # Layer 0's channels rank far below everything else; layer 1's attention is the next lowest.
    ranking = [(torch.full((12,), 5.0).double(), torch.linspace(-9, -8, 96).double()),
               (torch.linspace(-3, 3, 12).double(), torch.linspace(1, 2, 96).double())]
    total = sum(m.n_units * m.unit_params for m in mods)  # 25,920 parameters; 2p = 0.2 of them
    counts = global_eligible(mods, ranking, 0.1, [False] * 4)
    assert counts == [0, 88, 5, 0]  # 88 channels (880) + 4 groups (4000) < 0.2 * total (5184): a 5th
    assert sum(c * m.unit_params for c, m in zip(counts, mods)) >= 0.2 * total
    rounds = sample_round(mods, priors, 0.1, 16, g, varied=True, ranking=ranking)
    assert [r.eligible.numel() for r in rounds] == [0, 88, 5, 0]
    assert rounds[2].eligible.tolist() == [0, 1, 2, 3, 4]  # the lowest-ranked groups, not lowest-prior
    assert (rounds[1].masks == 0).any() and (rounds[3].masks == 1).all()
    dropped = 1 - rounds[1].masks[:, rounds[1].eligible].mean()  # every pair perturbs a ranked MLP:
    assert 0.3 < float(dropped) < 0.7  # each mask drops half the eligible channels on average


def test_ranked_coarse_modules_join_the_ranking_only_where_it_puts_them_low():
    """coarse = "ranked" (skip_coarse False, with a ranking): two 3-group attentions at p = 0.1,
    too coarse to lose a group at that rate; the one whose groups FLAP's ranking puts lowest gets
    eligible groups and perturbed masks, the other none. With skip_coarse neither does."""
    from lowmem_bonsai.method.masks import Module
    from lowmem_bonsai.method.prune import sample_round

    g = torch.Generator().manual_seed(1)
    mods = [Module(0, "attn", 3, 1000, 1), Module(0, "mlp", 96, 10, 8, 8),
            Module(1, "attn", 3, 1000, 1), Module(1, "mlp", 96, 10, 8, 8)]
    priors = [(torch.rand(3, generator=g).double(), torch.rand(96, generator=g).double()) for _ in range(2)]
    ranking = [(torch.tensor([-9.0, -8.0, 4.0]).double(), torch.linspace(-1, 1, 96).double()),
               (torch.full((3,), 9.0).double(), torch.linspace(0, 2, 96).double())]
    ranked = sample_round(mods, priors, 0.1, 32, g, varied=True, ranking=ranking, skip_coarse=False)
    assert ranked[0].eligible.tolist() == [0, 1] and (ranked[0].masks[:, :2] == 0).any()
    assert ranked[2].eligible.numel() == 0 and (ranked[2].masks == 1).all()
    skipped = sample_round(mods, priors, 0.1, 32, g, varied=True, ranking=ranking)
    assert skipped[0].eligible.numel() == 0 and (skipped[0].masks == 1).all()
    assert skipped[1].eligible.numel() > 0


def test_global_prior_scope_ranks_the_eligible_units_across_layers():
    """prior_scope = global: the regression's base prior is each eligible unit's rank in the
    cross-layer ranking, not its module's prior normalised to mean 1."""
    from lowmem_bonsai.method.masks import Module
    from lowmem_bonsai.method.prune import design_of, sample_round

    g = torch.Generator().manual_seed(0)
    mods = [Module(0, "mlp", 64, 10, 8, 8), Module(1, "mlp", 64, 10, 8, 8)]
    priors = [(None, torch.rand(64, generator=g).double()) for _ in range(2)]
    ranking = [(None, torch.linspace(0, 1, 64).double()), (None, torch.linspace(0.5, 1.5, 64).double())]
    rounds = sample_round(mods, priors, 0.2, 8, g, varied=True, ranking=ranking)
    by_module = design_of(rounds)
    ranked = design_of(rounds, ranking)
    z = torch.cat([ranking[i][1][r.eligible] for i, r in enumerate(rounds)])
    n = z.numel()
    assert n == sum(r.eligible.numel() for r in rounds) > 0
    assert torch.equal(torch.argsort(ranked.prior), torch.argsort(z))  # the ranking's order, across layers
    assert sorted(ranked.prior.tolist()) == [k / n for k in range(1, n + 1)]
    assert torch.equal(ranked.x, by_module.x) and ranked.owners == by_module.owners
    for i in range(2):  # by module: mean 1 within each module
        assert abs(float(by_module.prior[by_module.groups == i].mean()) - 1) < 1e-9


def test_prior_seqs_widen_the_prior_pass_not_the_masks(tmp_path, tiny, sample_text):
    """prior_seqs = 8 > calib_seqs = 2: each round's unmasked pass reads 8 windows (its loss is
    theirs), the masks read the first 2, and the forward tokens count both."""
    from lowmem_bonsai.pipeline import calibration_tokens

    _, model_dir = tiny
    prof = profile(calib_seqs=2, prior_seqs=8, masks_per_round=4)
    report = prune_model(model_dir=model_dir, out_dir=tmp_path / "o", sparsity=0.1, profile=prof,
                         calib=sample_text)
    windows = calibration_tokens(model_dir, sample_text, prof)
    assert windows.shape == (8, 32)
    r1 = report["rounds"][0]
    nll = streamed_nll(Checkpoint(model_dir), windows)[0]
    assert r1["calib_loss"] == pytest.approx(float(nll.sum()) / (8 * 31), rel=1e-5)
    assert r1["forward_tokens"] == 8 * 32 + 4 * 2 * 32
    assert report["settings"]["calib_seqs"] == 2 and report["settings"]["prior_seqs"] == 8


def test_unreachable_sparsity_stops_with_a_reason_and_exit_0(tmp_path, sample_text, sparsity=0.9):
    """A round where no module has eligible units used to crash in design_of (torch.cat of [])."""
    make_tiny(tmp_path / "m", "llama-gqa-tied")
    write_word_tokenizer(tmp_path / "m", sample_text.read_text())
    res = CliRunner().invoke(app, ["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                                   "--calib", str(sample_text), "--sparsity", str(sparsity),
                                   "--profile", "quick", "--masks-per-round", "8", "--seq-len", "32"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert 0.3 < report["achieved_sparsity"] < sparsity
    assert f"of the target {sparsity:.3f}: no module could lose another unit" in res.output


def test_min_width_floors_every_module_at_a_share_of_its_source_width():
    """Floors come from the source's widths, rounded up to whole units / align channels, and stay
    floors as the plan narrows (a module at its floor offers nothing)."""
    from lowmem_bonsai.method.masks import modules_of
    from lowmem_bonsai.model.config import parse_config

    cfg = parse_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "intermediate_size": 256, "vocab_size": 211}, source="test")
    dense = Plan.dense(cfg)
    attn, mlp = modules_of(cfg, dense, 32, min_width=0.3)[:2]
    assert (attn.min_units, mlp.min_units, mlp.piece) == (2, 96, 32)  # ceil(1.2) groups; 76.8 -> 96
    assert [m.min_units for m in modules_of(cfg, dense, 32)[:2]] == [1, 32]  # min_width 0: one unit
    query = modules_of(cfg, dense, 32, head_unit="query", min_width=0.6)[0]
    assert (query.n_units, query.min_units) == (2, 2)  # ceil(0.6 x 2 query heads per group)
    narrowed = dense.without(cfg, {(0, "mlp"): list(range(200))})  # 56 channels left, below the floor
    mlp = modules_of(cfg, narrowed, 32, min_width=0.3)[1]
    assert (mlp.n_units, mlp.min_units) == (56, 56)


@pytest.mark.parametrize("method", ["bonsai", "flap"])
def test_min_width_holds_in_the_plan_and_an_unreachable_target_is_refused(tmp_path, tiny, sample_text,
                                                                          method):
    _, model_dir = tiny
    report = prune_model(model_dir=model_dir, out_dir=tmp_path / "o", sparsity=0.5, method=method,
                         profile=profile(allocation="global", eligible="global", min_width=0.4),
                         calib=sample_text)
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.02
    assert all(l["channels"] >= 104 and l["channels"] % 8 == 0 for l in report["layers"])  # 0.4 x 256
    assert all(l["kv_heads"] >= 2 for l in report["layers"])  # ceil(0.4 x 4)
    without = prune_model(model_dir=model_dir, out_dir=tmp_path / "n", sparsity=0.5, method=method,
                          profile=profile(allocation="global", eligible="global"), calib=sample_text)
    assert min(l["channels"] for l in without["layers"]) < 104  # the floor changed the plan
    res = CliRunner().invoke(app, ["prune", str(model_dir), "--out", str(tmp_path / "p"), "--calib",
                                   str(sample_text), "--sparsity", "0.7", "--min-width", "0.5"])
    assert res.exit_code == 2, res.output
    assert "min_width = 0.5" in res.output and "removable" in res.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()

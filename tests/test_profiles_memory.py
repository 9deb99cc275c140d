from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.model.config import parse_config
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.engine.memory import plan_memory
from lowmem_bonsai.profiles import PROFILE_DIR, load_profile

from .conftest import make_tiny, write_word_tokenizer

LLAMA2_13B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40, "intermediate_size": 13824,
              "vocab_size": 32000}


def test_every_shipped_profile_parses_and_starts_with_its_command():
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
    assert "laptop-16gb" in names and len(names) >= 3
    for name in names:
        assert load_profile(name).name == name
        assert (PROFILE_DIR / f"{name}.toml").read_text().startswith("# lowmem-bonsai ")


REFUSED = [  # (profile text, words of the refusal)
    ('mask_per_round = 8\n', "unknown key 'mask_per_round'"),
    ('masks_per_round = "many"\n', "should be an integer"),
    ('masks_per_round = 7\n', "even"),
    ('eligible = "everything"\n', "eligible must be module or global"),
    ('mask_fill = "median"\n', "mask_fill must be zero or mean"),
    # the ranking prior_scope reads comes with eligible = "global"
    ('prior_scope = "global"\n', 'prior_scope = "global" needs eligible = "global"'),
    ('coarse = "ranked"\n', 'coarse = "ranked" needs eligible = "global"'),
    ('coarse = "all"\n', "coarse must be skip or ranked"),
    ('reconstruct_target = "output"\n', "reconstruct_target must be layer, dense or stream"),
    ('reconstruct_target = "stream"\nreconstruct_sequential = false\n',
     'reconstruct_target = "stream" needs reconstruct_sequential = true'),
]


def test_profile_rejects_unknown_keys_and_wrong_types(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, words in REFUSED:
        bad.write_text(text)
        with pytest.raises(UserError, match=words):
            load_profile(bad)
    bad.write_text('prior_scope = "global"\neligible = "global"\n')
    assert load_profile(bad).prior_scope == "global"


def test_choosing_bias_turns_the_profiles_reselection_off_and_a_file_with_both_is_refused(tmp_path):
    quick = load_profile("quick")
    assert quick.reconstruct_reselect
    bias = quick.with_repair("bias")
    assert bias.reconstruct == "bias" and not bias.reconstruct_reselect
    assert quick.with_repair("lsq").reconstruct_reselect and quick.with_repair(None) == quick
    assert quick.replace(reconstruct="none").with_repair("lsq").reconstruct == "lsq"
    with pytest.raises(UserError, match="reconstruct_reselect = true needs"):
        quick.replace(reconstruct="bias")
    f = tmp_path / "both.toml"
    f.write_text('reconstruct = "bias"\nreconstruct_reselect = true\n')
    with pytest.raises(UserError, match="reconstruct_reselect = true needs"):
        load_profile(f)
    heads = quick.replace(reconstruct_reselect_heads=True)  # the heads are chosen with the channels
    assert not quick.reconstruct_reselect_heads and heads.reconstruct_reselect_heads
    both_off = heads.with_repair("bias")
    assert not both_off.reconstruct_reselect and not both_off.reconstruct_reselect_heads
    with pytest.raises(UserError, match="reconstruct_reselect_heads = true needs reconstruct_reselect = true"):
        heads.replace(reconstruct_reselect=False)


def test_planner_fits_13b_in_16gb_and_refuses_a_budget_that_cannot_work():
    cfg = parse_config(LLAMA2_13B, source="13b")
    plan = plan_memory(cfg, load_profile("laptop-16gb"))
    assert plan.total_gb <= plan.budget_gb and plan.wave_masks >= 2
    # two fp32 13B blocks alone are 2.4 GiB
    assert 2.3 < plan.resident_blocks_gb < 3.0
    with pytest.raises(UserError, match="too small.*raise memory_gb"):
        plan_memory(cfg, load_profile("laptop-16gb").replace(memory_gb=2.0))


def test_waves_shrink_with_the_budget():
    cfg = parse_config(LLAMA2_13B, source="13b")
    prof = load_profile("laptop-16gb").replace(masks_per_round=256, calib_seqs=16, seq_len=512)
    small, large = plan_memory(cfg, prof.replace(memory_gb=12.0)), plan_memory(cfg, prof.replace(memory_gb=48.0))
    assert small.wave_masks < large.wave_masks and small.waves > large.waves
    assert small.total_gb <= 12.0


def test_estimate_cli(tmp_path):
    make_tiny(tmp_path / "m", "llama-gqa-tied")
    res = CliRunner().invoke(app, ["estimate", str(tmp_path / "m"), "--sparsity", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    e = json.loads(res.output)
    assert e["rounds"] == 5 and e["matmul_gflops_measured"] > 0 and e["eta_hours"] > 0  # rounds of 10 % to 50 %
    assert e["forward_tflops_per_round"][0] > e["forward_tflops_per_round"][-1]


def test_gpu_profile_plans_the_device_and_the_host_apart():
    cfg = parse_config(LLAMA2_13B, source="13b")
    prof = load_profile("gpu-24gb")
    plan = plan_memory(cfg, prof)
    assert plan.device == "cuda" and plan.device_budget_gb == 22.0
    assert plan.device_total_gb <= 22.0 and plan.wave_masks == prof.masks_per_round
    # one bf16 13B block on the GPU (0.59 GiB); the host holds the prefetched ones, not the store
    assert 0.55 < plan.device_block_gb < 0.65
    assert plan.hidden_store_gb > 5
    # the rounds' host side is small; the reconstruction (64 x 256 tokens in 16k-token chunks, fp32
    # on the host) is the host's peak, within the profile's 28 GiB
    assert plan_memory(cfg, prof.replace(reconstruct="none")).total_gb < 8
    assert plan.total_gb == pytest.approx(plan.reconstruction_gb) and plan.total_gb <= prof.memory_gb
    with pytest.raises(UserError, match="raise device_memory_gb"):
        plan_memory(cfg, prof.replace(device_memory_gb=1.0))
    with pytest.raises(UserError, match="no GPU is visible"):
        plan_memory(cfg, prof.replace(device_memory_gb=0.0))
    free = plan_memory(cfg, prof.replace(device_memory_gb=0.0), device_free_bytes=10 * 1024**3)
    assert free.device_budget_gb == pytest.approx(9.0) and free.wave_masks < plan.wave_masks
    with pytest.raises(UserError, match="device must be"):
        prof.replace(device="tpu")


def test_gpu_profile_without_a_gpu_is_refused_before_any_work(tmp_path, monkeypatch, sample_text):
    import torch

    from lowmem_bonsai.engine.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="sees no CUDA GPU here"):
        resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    make_tiny(tmp_path / "m", "llama-gqa-tied")
    res = CliRunner().invoke(app, ["estimate", str(tmp_path / "m"), "--profile", "gpu-24gb"])
    assert res.exit_code == 0, res.output
    assert "device     block" in res.output and "no ETA" in res.output
    write_word_tokenizer(tmp_path / "m", sample_text.read_text())
    out = tmp_path / "p"
    res = CliRunner().invoke(app, ["prune", str(tmp_path / "m"), "--out", str(out), "--sparsity", "0.2",
                                   "--calib", str(sample_text), "--profile", "gpu-24gb"])
    assert res.exit_code != 0 and "sees no CUDA GPU here" in res.output
    assert not (out / "model.safetensors").exists()
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "m"), "--data", str(sample_text), "--device", "cuda"])
    assert res.exit_code != 0 and "sees no CUDA GPU here" in res.output


def test_estimate_counts_the_elimination_over_heads_only_where_the_repair_chooses_heads(tiny_llama):
    """reconstruct_reselect_heads adds the greedy elimination over o_proj's head blocks to the
    repair's work: per layer the start (the inverse, 2 n^3 with n = heads x head_dim + 1, and the
    refit, 2 hidden n^2), per dropped head the downdates of the refit and the inverse (2 x head_dim
    x n x (n + hidden)) and the scores (at most every head per step), fp64 counted twice; the
    summary and the CLI say which."""
    from lowmem_bonsai.engine.memory import SOLVE_FP64_MAX
    from lowmem_bonsai.estimate import estimate
    from lowmem_bonsai.model.checkpoint import Checkpoint

    cfg = Checkpoint(tiny_llama).config
    profile = load_profile("quick").replace(reconstruct_gap_weight=0.0)  # one repair; two: a test below
    runs = {heads: estimate(model_dir=tiny_llama, profile=profile.replace(reconstruct_reselect_heads=heads),
                            sparsity=0.5, measure_seconds=0.01)["reconstruction"] for heads in (False, True)}
    assert runs[False]["reselect"] and not runs[False]["reselect_heads"] and runs[True]["reselect_heads"]
    want = 0.0
    for s in cfg.layers:
        n, hd, h, drops = s.num_attention_heads * cfg.head_dim + 1, cfg.head_dim, cfg.hidden_size, \
            round(0.5 * s.num_attention_heads)
        assert n - 1 <= SOLVE_FP64_MAX  # a tiny model's solves run in fp64: counted twice
        want += 2 * (n ** 3 + 2 * h * n ** 2 + drops * 2 * hd * n * (n + h)
                     + drops * s.num_attention_heads * (2 / 3 * hd ** 3 + 2 * hd ** 2 * h))
    assert (runs[True]["tflops"] - runs[False]["tflops"]) * 1e12 == pytest.approx(want, rel=1e-9)


def test_estimate_times_the_repair_at_the_cpus_float32_rate_and_its_reads(tiny_llama, monkeypatch):
    """The repair runs on the CPU in float32 whatever the profile computes the masks in: the ETA
    times the rounds at the profile dtype's rate and the repair at float32's, plus the MLP
    elimination's reads of its refit (one per dropped channel) at the measured read rate."""
    from lowmem_bonsai import estimate as estimate_module
    from lowmem_bonsai.engine.memory import ELIMINATION_BLOCK
    from lowmem_bonsai.model.checkpoint import Checkpoint

    rates = {"bfloat16": 400.0, "float32": 100.0}
    monkeypatch.setattr(estimate_module, "measure_matmul_gflops",
                        lambda dtype, **kw: rates[str(dtype).removeprefix("torch.")])
    monkeypatch.setattr(estimate_module, "measure_read_gbps", lambda **kw: 10.0)
    cfg = Checkpoint(tiny_llama).config
    profile = load_profile("quick").replace(compute_dtype="bfloat16", reconstruct_gap_weight=0.0)  # one repair
    e = estimate_module.estimate(model_dir=tiny_llama, profile=profile, sparsity=0.5)
    r = e["reconstruction"]
    assert e["matmul_gflops_measured"] == 400.0 and e["repair_gflops_measured"] == 100.0
    assert e["read_gbps_measured"] == 10.0
    rounds_h = sum(e["forward_tflops_per_round"]) * 1e12 / (0.8 * 400e9) / 3600
    assert e["eta_hours_rounds"] == pytest.approx(rounds_h, rel=1e-9)
    reads = 0.0
    for s in cfg.layers:  # fp64 below SOLVE_FP64_MAX: 8 bytes an element
        n = s.intermediate_size + 1
        reads += round(0.5 * s.intermediate_size) * 8 * (cfg.hidden_size * n * (1 + 3 / ELIMINATION_BLOCK)
                                                        + 1.5 * ELIMINATION_BLOCK * n)
    assert r["reselect_read_gb"] * 1e9 == pytest.approx(reads, rel=1e-9)
    repair_h = (r["tflops"] * 1e12 / (0.8 * 100e9) + reads / 10e9) / 3600
    assert e["eta_hours_repair"] == pytest.approx(repair_h, rel=1e-9)
    assert e["eta_hours"] == pytest.approx(rounds_h + repair_h, rel=1e-9)
    plain = estimate_module.estimate(model_dir=tiny_llama, profile=profile.replace(reconstruct="none"), sparsity=0.5)
    assert plain["eta_hours_repair"] == 0 and plain["repair_gflops_measured"] is None
    assert plain["eta_hours"] == pytest.approx(plain["eta_hours_rounds"])
    # reconstruct_dtype = bfloat16: the passes through the blocks (their tokens x the blocks' flops
    # and causal attention's) at bf16's rate, the moments, solves and elimination still at float32's
    half = estimate_module.estimate(model_dir=tiny_llama, profile=profile.replace(reconstruct_dtype="bfloat16"),
                                    sparsity=0.5)
    assert half["reconstruction"]["dtype"] == "bfloat16" and r["dtype"] == "float32"
    assert half["repair_pass_gflops_measured"] == 400.0 and half["repair_gflops_measured"] == 100.0
    t_r = profile.reconstruct_seq_len
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t_r
    pass_flops = r["forward_tokens"] * (2 * e["params_blocks"] + attn)
    saved_h = pass_flops * (1 / (0.8 * 100e9) - 1 / (2 / 3 * 400e9)) / 3600  # bf16 passes at 2/3 of the probe
    assert 0 < saved_h < repair_h
    assert half["eta_hours_repair"] == pytest.approx(repair_h - saved_h, rel=1e-9)
    assert half["reconstruction"]["tflops"] == r["tflops"]


def test_estimate_counts_a_gap_weighted_repair_twice(tiny_llama):
    """reconstruct_gap_weight runs the final repair twice: twice its forward tokens, passes,
    moments, solves and elimination, and the first's two final streams through the head."""
    from lowmem_bonsai.estimate import estimate
    from lowmem_bonsai.model.checkpoint import Checkpoint

    cfg = Checkpoint(tiny_llama).config
    profile = load_profile("quick")
    once, twice = (estimate(model_dir=tiny_llama, profile=profile.replace(reconstruct_gap_weight=share),
                            sparsity=0.5, measure_seconds=0.01)["reconstruction"] for share in (0.0, 0.5))
    assert (once["repairs"], twice["repairs"]) == (1, 2) and twice["final_repairs"] == 2
    assert twice["forward_tokens"] == 2 * once["forward_tokens"]
    assert twice["reselect_read_gb"] == pytest.approx(2 * once["reselect_read_gb"])
    head = 2 * 2 * twice["windows"] * profile.reconstruct_seq_len * cfg.vocab_size * cfg.hidden_size
    assert (twice["tflops"] - 2 * once["tflops"]) * 1e12 == pytest.approx(head, rel=1e-9)


def _small(name: str, **changes):
    """The shipped profile ``name`` made small enough for the 2-layer test model."""
    return load_profile(name).replace(seq_len=32, calib_seqs=2, masks_per_round=4, prior_seqs=4, align=8,
                                      threads=1, **changes)


@pytest.mark.parametrize("name, repairs", [("quick", 2), ("laptop-16gb", 1)])
def test_a_prune_computes_the_forward_tokens_estimate_states(tmp_path, tiny_llama, sample_text, name, repairs):
    """What `estimate` states before the work (forward tokens per round x rounds, and the final
    repair's, twice in `quick`) is what the prune computes and records, for the shipped profiles'
    settings made small. (At 50 % this 2-layer model's coarse units leave a sixth round that
    removes nothing after the five `estimate` counts: its prior pass's tokens more than stated, the
    next test; FLAP plans one round and may top it up.)"""
    from lowmem_bonsai.estimate import estimate
    from lowmem_bonsai.pipeline import prune_model

    profile = _small(name, reconstruct_seqs=8, reconstruct_seq_len=32)
    stated = estimate(model_dir=tiny_llama, profile=profile, sparsity=0.3, measure_seconds=0.01)
    report = prune_model(model_dir=tiny_llama, out_dir=tmp_path / "o", sparsity=0.3, profile=profile,
                         calib=sample_text)
    assert stated["rounds"] == len(report["rounds"]) == 3
    assert report["forward_tokens"] == stated["rounds"] * stated["forward_tokens_per_round"] == 3 * 32 * (4 + 2 * 4)
    assert stated["reconstruction"]["repairs"] == repairs
    assert report["reconstruction"]["forward_tokens"] == stated["reconstruction"]["forward_tokens"] > 0


def test_a_round_with_nothing_to_drop_costs_its_prior_pass_only(tmp_path, tiny_llama, sample_text):
    """At 50 % the 2-layer model's MLPs reach their floor and its attention groups are too coarse
    for what is left: a sixth round finds no unit the masks may drop, scores no mask, removes
    nothing and ends the prune. Its report counts its prior pass only, not masks it never scored."""
    from lowmem_bonsai.estimate import estimate
    from lowmem_bonsai.pipeline import prune_model

    profile = _small("laptop-16gb", reconstruct="none")
    stated = estimate(model_dir=tiny_llama, profile=profile, sparsity=0.5, measure_seconds=0.01)
    report = prune_model(model_dir=tiny_llama, out_dir=tmp_path / "o", sparsity=0.5, profile=profile,
                         calib=sample_text)
    rounds = report["rounds"]
    assert stated["rounds"] == 5 and len(rounds) == 6
    assert rounds[-1]["params_after"] == rounds[-1]["params_before"] and rounds[-1]["masks"] == 0
    assert all(r["masks"] == 4 for r in rounds[:-1])
    assert report["forward_tokens"] == 5 * stated["forward_tokens_per_round"] + 4 * 32


def test_the_readmes_flap_as_published_profile_is_flap_as_published(tmp_path, tiny_llama):
    """The README's `flap-paper.toml` (FLAP's ranking and its one-shot bias from 1024 x 128 tokens,
    the results' baseline) relies on the defaults of the keys it leaves out: should one of them
    change (position weights, chat turns, a floor, a second repair), the recipe would silently stop
    being FLAP as published."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(# flap-paper\.toml.*?)```", readme, flags=re.S)
    (tmp_path / "flap-paper.toml").write_text(block)
    p = load_profile(tmp_path / "flap-paper.toml")
    assert (p.calib_seqs, p.seq_len, p.reconstruct_seqs, p.reconstruct_seq_len) == (1024, 128, 1024, 128)
    assert (p.reconstruct, p.reconstruct_sequential, p.reconstruct_target) == ("bias", False, "layer")
    assert (p.reconstruct_position_power, p.reconstruct_chat, p.reconstruct_gap_weight, p.min_width) == (0, 0, 0, 0)
    assert not (p.reconstruct_reselect or p.reconstruct_in_rounds or p.reconstruct_unpruned)
    assert p.compute_dtype == "float32" and p.reconstruct_dtype == "float32"
    assert p.calib_span_tokens == p.tokens_read(True) == 1024 * 128 and p.prior_windows == 1024
    assert (p.align, p.head_unit, p.calib_windows) == (32, "group", "first")
    from lowmem_bonsai.estimate import estimate  # FLAP plans one round, whatever prune_frac

    assert estimate(model_dir=tiny_llama, profile=p, sparsity=0.2, method="flap", measure_seconds=0.01)["rounds"] == 1

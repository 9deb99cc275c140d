"""reconstruct_in_rounds: later rounds score the repaired model, the final repair is still refit
from the source, a resume reuses or redoes the repair between the rounds, bad settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.engine.forward import streamed_nll
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.method.reconstruct import passes, reconstruct, settings_of
from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.model.plan import Plan
from lowmem_bonsai.pipeline import calibration_sets, prune_model, write_checkpoint
from lowmem_bonsai.profiles import Profile, load_profile

from .conftest import make_tiny, refused, sample_words, write_word_tokenizer

SPARSITY = 0.2  # two rounds of prune_frac 0.1 (a third, small one where widths round)


def _profile(in_rounds: bool, reselect: bool = True) -> Profile:
    """The default profile, small; it reselects the MLP channels in the final repair as the default
    does (``reselect``), never in the repairs between the rounds."""
    return load_profile(None).replace(reconstruct_reselect=reselect,
                                      seq_len=32, calib_seqs=4, masks_per_round=8, align=8, prune_frac=0.1,
                                      reconstruct="lsq", reconstruct_seqs=8, reconstruct_seq_len=32,
                                      compute_dtype="float32", reconstruct_dtype="float32", threads=1,
                                      reconstruct_in_rounds=in_rounds,
                                      # the module-local sampler: a 10 % prune then ends with a round
                                      # that removes nothing (test_a_repair_between_rounds_...)
                                      eligible="module", prior_seqs=0,
                                      # every token alike: with the position weighting the repaired
                                      # plan's round 2 chooses the same units as the plain one on
                                      # this tiny model, and these tests need them to differ
                                      reconstruct_position_power=0.0)


def _prune(setup, out: Path, *, in_rounds: bool, sparsity: float = SPARSITY, reselect: bool = True,
           **kwargs) -> dict:
    model_dir, text = setup
    return prune_model(model_dir=model_dir, out_dir=out, sparsity=sparsity, calib=text, seed=1,
                       profile=_profile(in_rounds, reselect), **kwargs)


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("plan.json", "model.safetensors", "config.json")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("inround")
    make_tiny(d / "m", "llama-gqa-tied", layers=3, intermediate_size=128, num_attention_heads=8,
              num_key_value_heads=4)
    text = d / "calib.txt"
    text.write_text(sample_words(), encoding="utf-8")
    write_word_tokenizer(d / "m", text.read_text())
    return d / "m", text


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """The prune with the key off and on, and the first round alone (key off), each run once."""
    d = tmp_path_factory.mktemp("runs")
    out = {}
    for name, in_rounds, sparsity in (("off", False, SPARSITY), ("on", True, SPARSITY), ("round1", False, 0.1)):
        # round1's plan.json is round 1's choice: its final repair must not reselect
        out[name] = (d / name, _prune(setup, d / name, in_rounds=in_rounds, sparsity=sparsity,
                                      reselect=name != "round1"))
    return out


def test_rounds_after_the_first_score_the_repaired_plan(setup, runs):
    model_dir, text = setup
    (_, off), (on_dir, on), (first_dir, first) = runs["off"], runs["on"], runs["round1"]
    # `first` stopped after its round 1 (a second round found nothing to remove): its plan is round 1's.
    assert len(on["rounds"]) >= 2 and all(r["params_after"] == r["params_before"] for r in first["rounds"][1:])
    assert first["params_after"] == on["rounds"][0]["params_after"] == off["rounds"][0]["params_after"]
    # Round 1 scores the source either way; round 2 scores what the key says.
    same = lambda r: json.dumps({**r, "seconds": 0})  # noqa: E731  (NaN == NaN as text: cv_tau of 8 masks)
    assert same(on["rounds"][0]) == same(off["rounds"][0])
    assert on["rounds"][1]["calib_loss"] != off["rounds"][1]["calib_loss"]

    # Independently: round 1's plan repaired from the source, its NLL on the calibration windows.
    # The profile reselects (the default's), but a repair between the rounds keeps the plan's units.
    src = Checkpoint(model_dir)
    assert _profile(True).reconstruct_reselect
    tokens, repair_tokens = calibration_sets(model_dir, text, _profile(True))
    plan1 = Plan.load(first_dir / "plan.json")
    rep = reconstruct(src, plan1, repair_tokens, first_dir.parent / "check-repair",
                      **{**settings_of(_profile(True)), "reselect": False})
    nll = streamed_nll(src.with_overlay(rep.files), tokens, plan=plan1)
    want = float(nll.sum()) / (tokens.shape[0] * (tokens.shape[1] - 1))
    assert on["rounds"][1]["calib_loss"] == pytest.approx(want, rel=1e-6)
    unrepaired = float(streamed_nll(src, tokens, plan=plan1).sum()) / (tokens.shape[0] * (tokens.shape[1] - 1))
    assert off["rounds"][1]["calib_loss"] == pytest.approx(unrepaired, rel=1e-6)
    assert abs(want - unrepaired) > 1e-5 * abs(want)  # the tolerance above tells the two apart
    # ... while the final repair did reselect: the plan written is not the one the rounds chose
    assert sum(info.get("channels_changed", 0) for info in on["reconstruction"]["layers"]) > 0

    # The repairs between the rounds count in the forward tokens: the passes over the repair's windows.
    scored = tokens.numel() + 8 * tokens[:4].numel()  # the prior pass's windows, then 8 masks on the first 4
    assert [r["repair_tokens"] for r in on["rounds"]] == [0] + [passes(_profile(True).reconstruct_target) * repair_tokens.numel()] * (len(on["rounds"]) - 1)
    assert [r["forward_tokens"] for r in on["rounds"]] == [scored + r["repair_tokens"] for r in on["rounds"]]
    assert on["forward_tokens"] == sum(r["forward_tokens"] for r in on["rounds"]) > off["forward_tokens"]
    assert on["forward_tokens_per_rank"] == [on["forward_tokens"]]
    assert not on_dir.with_name("on.partial").exists()  # the repairs' folders went with the rest


def test_the_final_repair_is_refit_from_the_source(setup, runs, tmp_path):
    model_dir, text = setup
    on_dir, _ = runs["on"]
    src = Checkpoint(model_dir)
    plan = Plan.load(on_dir / "plan.json")
    assert plan.layers != Plan.load(runs["off"][0] / "plan.json").layers  # the key chose other units
    _, repair_tokens = calibration_sets(model_dir, text, _profile(True))
    rep = reconstruct(src, plan, repair_tokens, tmp_path / "repair", **settings_of(_profile(True)))
    out = tmp_path / "o"
    out.mkdir()
    write_checkpoint(src.with_overlay(rep.files), plan, out, model_dir=model_dir, profile=_profile(True))
    assert (out / "model.safetensors").read_bytes() == (on_dir / "model.safetensors").read_bytes()
    # A refit from a checkpoint with an earlier repair laid over it would target pruned weights.
    with pytest.raises(ValueError, match="refits from the source's weights"):
        reconstruct(src.with_overlay(rep.files), plan, repair_tokens, tmp_path / "again", mode="lsq")


def test_a_repair_between_rounds_leaves_the_output_of_the_same_plan_unchanged(runs, setup, tmp_path):
    """At 10 % round 1 leaves a little to remove and round 2, scored on round 1's repaired plan,
    removes nothing: the plan is the key-off one, and so, byte for byte, is the output (the final
    repair is refit from the source, not from the repair round 2 scored)."""
    first_dir, first = runs["round1"]
    report = _prune(setup, tmp_path / "on1", in_rounds=True, sparsity=0.1, reselect=False)  # as round1
    assert [r["repair_tokens"] > 0 for r in report["rounds"]] == [False, True]
    assert report["rounds"][1]["params_after"] == report["rounds"][1]["params_before"]
    assert report["rounds"][1]["calib_loss"] != first["rounds"][1]["calib_loss"]
    mine, theirs = _outputs(tmp_path / "on1"), _outputs(first_dir)
    assert json.loads(mine["plan.json"])["layers"] == json.loads(theirs["plan.json"])["layers"]
    assert mine["model.safetensors"] == theirs["model.safetensors"]
    assert mine["config.json"] == theirs["config.json"]


class Stop(BaseException):
    """Stands for a kill (a BaseException, as Ctrl-C: the progress is kept)."""


def _stop_at(stage: str):
    """A progress callback that stops the prune at its first ``stage`` event after round 1 ended."""
    seen = {"round": 0}

    def progress(s: str, done: int, total: int) -> None:
        if s == "round":
            seen["round"] = done
        if s == stage and seen["round"] >= 1 and done == 2:
            raise Stop
    return progress


@pytest.mark.parametrize("stage, reused", [("repair", False), ("prior", True)])
def test_a_resume_after_a_kill_between_rounds_gives_the_same_output(setup, runs, tmp_path, caplog, stage, reused):
    """Killed in the middle of the repair before round 2 (its folder unfinished: redone) or in round
    2's prior pass (the repair finished: reused), the resumed prune writes the uninterrupted one's
    output."""
    on_dir, on = runs["on"]
    out = tmp_path / "out"
    with pytest.raises(Stop):
        _prune(setup, out, in_rounds=True, progress=_stop_at(stage))
    folder = tmp_path / "out.partial" / "repair-round-1"
    assert folder.is_dir() and (folder / "done.json").is_file() is reused
    with caplog.at_level("INFO"):
        report = _prune(setup, out, in_rounds=True, resume=True)
    assert ("made before the restart" in caplog.text) is reused
    assert _outputs(out) == _outputs(on_dir)
    assert [r["forward_tokens"] for r in report["rounds"]] == [r["forward_tokens"] for r in on["rounds"]]
    assert not (tmp_path / "out.partial").exists()


def test_a_finished_repair_of_another_plan_is_redone(setup, runs, tmp_path, caplog):
    on_dir, _ = runs["on"]
    out = tmp_path / "out"
    with pytest.raises(Stop):
        _prune(setup, out, in_rounds=True, progress=_stop_at("prior"))
    done = tmp_path / "out.partial" / "repair-round-1" / "done.json"
    data = json.loads(done.read_text())
    data["layers"][0]["channels"] = data["layers"][0]["channels"][:-8]
    done.write_text(json.dumps(data))
    with caplog.at_level("INFO"):
        _prune(setup, out, in_rounds=True, resume=True)
    assert "made before the restart" not in caplog.text
    assert _outputs(out) == _outputs(on_dir)


def test_without_a_reconstruction_the_key_is_refused():
    with pytest.raises(UserError) as err:
        load_profile(None).replace(reconstruct="none", reconstruct_in_rounds=True)
    assert "\n" not in str(err.value) and "reconstruct_in_rounds" in str(err.value)


@pytest.mark.parametrize("body, method, words", [
    ('reconstruct = "none"\nreconstruct_in_rounds = true\n', "bonsai",
     ["reconstruct_in_rounds = true needs reconstruct = bias or lsq"]),
    ('reconstruct = "lsq"\nreconstruct_in_rounds = true\n', "flap",
     ["--method flap", "first round", "reconstruct_in_rounds = false"]),
    ('reconstruct = "lsq"\nreconstruct_in_rounds = "yes"\n', "bonsai", ["'reconstruct_in_rounds'", "should be true or false"]),
])
@pytest.mark.parametrize("command", ["prune", "estimate"])
def test_bad_settings_are_one_line_and_exit_2(setup, tmp_path, body, method, words, command):
    model_dir, text = setup
    profile = tmp_path / "p.toml"
    profile.write_text(f"# lowmem-bonsai prune M --out O --profile THIS.toml\n{body}")
    args = [command, str(model_dir), "--profile", str(profile), "--sparsity", "0.2", "--method", method]
    if command == "prune":
        args += ["--out", str(tmp_path / "out"), "--calib", str(text)]
    refused(CliRunner().invoke(app, args), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_estimate_counts_a_repair_before_every_round_after_the_first(setup, tmp_path):
    from lowmem_bonsai.estimate import estimate

    model_dir, _ = setup
    off = estimate(model_dir=model_dir, profile=_profile(False), sparsity=0.3, measure_seconds=0.01)
    on = estimate(model_dir=model_dir, profile=_profile(True), sparsity=0.3, measure_seconds=0.01)
    assert off["rounds"] == on["rounds"] == 3
    assert (off["reconstruction"]["repairs"], on["reconstruction"]["repairs"]) == (1, 3)
    each = passes(_profile(False).reconstruct_target) * 8 * 32  # 8 windows of 32 tokens
    assert on["reconstruction"]["forward_tokens"] == 3 * off["reconstruction"]["forward_tokens"] == 3 * each
    assert on["forward_tflops_total"] > off["forward_tflops_total"]

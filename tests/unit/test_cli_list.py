"""``lmpo list --markdown``: one row per preset, naming its components, their papers and the fidelity."""

from lmpo.cli import main, preset_rows
from lmpo.methods.presets import PRESETS
from lmpo.registry import LOSSES


def test_every_preset_has_a_row_with_papers_and_fidelity():
    rows = {r["preset"]: r for r in preset_rows()}
    assert set(rows) == set(PRESETS)
    for r in rows.values():
        assert r["papers"] and r["fidelity"] in ("exact", "reconstructed")
    assert rows["grpo"]["components"] == "grpo + ppo_clip + seq_mean_token_mean"
    assert rows["dapo"]["components"].endswith("dynamic_sampling + overlong_penalty")


def test_a_reconstructed_component_marks_its_preset():
    rec = {e.name for e in LOSSES.entries() if e.fidelity == "reconstructed"}
    for r in preset_rows():
        if PRESETS[r["preset"]].get("loss", {}).get("name") in rec:
            assert r["fidelity"] == "reconstructed", r["preset"]


def test_params_flag_shows_defaults_ranges_and_requirements(capsys):
    assert main(["list", "--kind", "advantage", "--params"]) == 0
    out = capsys.readouterr().out
    assert "      d_half = 0.06  (> 0)\n" in out
    assert "      budgets = (2000, 4000, 6000, 8000)  (each > 0)\n" in out
    assert "      std_level = 'group'  (one of \"group\", \"batch\")\n" in out
    assert "      requires: rho_min must be <= rho_max\n" in out
    assert "      scale_by_std = True\n" in out  # no declared range

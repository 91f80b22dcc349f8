"""``lmpo list --markdown``: one row per preset, naming its components, their papers and the fidelity."""

from lmpo.cli import preset_rows
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

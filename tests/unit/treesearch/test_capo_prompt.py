"""CAPO prompt optimisation (arXiv:2504.16005): racing, the cost penalty, the t-test, the evolutionary loop."""

from __future__ import annotations

import random

import pytest

from lmpo.search.capo_prompt import CAPO, Prompt, main, race, significantly_better, t_sf


def test_t_sf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for t, df in [(0.5, 3), (2.0, 5), (-1.3, 7), (3.5, 20), (0.0, 4), (10.0, 2), (1.7, 60)]:
        assert t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-12)


def test_paired_test_by_hand():
    # d = [1, 1, 1, 1]: zero variance, positive mean -> better; equal scores -> not better
    assert significantly_better([1, 1, 1, 1], [0, 0, 0, 0], 0.05)
    assert not significantly_better([1, 0, 1, 0], [1, 0, 1, 0], 0.05)
    # d = [1, 0, 1, 1, 0, 1]: mean 2/3, sd 0.5164, t = 3.162 with 5 df -> p = 0.0125: better at 0.05, not at 0.01
    j, i = [1, 0, 1, 1, 0, 1], [0] * 6
    assert significantly_better(j, i, 0.05) and not significantly_better(j, i, 0.01)


def const_score(table):
    return lambda p, x: table[p.instruction][x]


def test_card_a_identical_scores_eliminate_nobody():
    cands = [Prompt(s) for s in ("a", "b", "c")]
    table = {s: {x: (x % 2) for x in range(20)} for s in "abc"}
    out = race(cands, list(range(20)), const_score(table), mu=2, block_size=5, z_max=10, alpha=0.2,
               penalty=lambda p: 0.0)
    assert [p.instruction for p, _ in out] == ["a", "b", "c"]  # nobody eliminated: ranking by the (equal) means


def test_card_b_shorter_prompt_ranks_first_under_the_penalty():
    cands = [Prompt("one two three four"), Prompt("one two")]
    table = {p.instruction: {x: 1.0 for x in range(6)} for p in cands}
    out = race(cands, list(range(6)), const_score(table), mu=2, block_size=3, z_max=2, alpha=0.2,
               penalty=lambda p: 0.05 * len(p.text().split()) / 4)
    assert [p.instruction for p, _ in out] == ["one two", "one two three four"]
    assert [s for _, s in out] == pytest.approx([1 - 0.025, 1 - 0.05])


def test_card_c_candidate_beaten_by_both_others_is_eliminated():
    # 0 scores 0 everywhere; 1 and 2 score 1 on most examples (differently): both beat 0, neither beats the other
    rows = list(range(8))
    table = {"x0": {r: 0.0 for r in rows}, "x1": {r: float(r % 4 != 0) for r in rows},
             "x2": {r: float(r % 4 != 1) for r in rows}}
    cands = [Prompt(k) for k in ("x0", "x1", "x2")]
    out = race(cands, rows, const_score(table), mu=2, block_size=8, z_max=1, alpha=0.2, penalty=lambda p: 0.0)
    assert sorted(p.instruction for p, _ in out) == ["x1", "x2"]


def test_evolution_finds_the_rewarded_instruction_and_mutation_rules():
    # the score rewards instructions containing "exact"; crossover and rewrite are string operators
    def score(p, x):
        return 1.0 if "exact" in p.instruction.split() else 0.0

    capo = CAPO(score, lambda a, b: a.split()[0] + " " + b.split()[-1], lambda a: a, population=2, crossovers=4,
                block_size=4, seed=0)
    ranked = capo.run(["be exact now", "be brief", "answer fast"], list(range(16)), ["s1", "s2", "s3"], 2)
    assert "exact" in ranked[0][0].instruction.split()
    rng = random.Random(0)
    for _ in range(50):
        m = capo.mutate(Prompt("i", ["s1", "s2"]), ["s1", "s2", "s3"], rng)
        assert 1 <= len(m.shots) <= 3 and len(set(m.shots)) == len(m.shots)


@pytest.mark.slow  # a minute of greedy generation on a loaded CPU
def test_cli_runs_offline_on_countdown(capsys):
    main(["--instruction", "Add two numbers", "--instruction", "Solve", "--generations", "1", "--task-params",
          '{"num_count": 3, "steps": 1, "ops": "+", "template": "{numbers} {target}=", "num_train": 24, '
          '"num_eval": 0}'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all('"instruction"' in line for line in lines)

"""SPO (arXiv:2509.13232): tracker baseline, batch normalisation, KL-adaptive forgetting, sampling weights, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.spo import SPOAdvantage, forgetting
from factories import from_config, make_batch


def with_keys(batch, keys):
    batch.meta = [{"prompt_key": k} for k in keys]
    return batch


def test_hand_advantage():
    # tracker: a and b at v = 0.3 (alpha 0.3, beta 0.7); c, d unseen (v = 0.5)
    # A_hat = r - v = [1 - 0.3, 0 - 0.3, 1 - 0.5, 0 - 0.5] = [0.7, -0.3, 0.5, -0.5]   (card test (a))
    # batch mean 0.1 -> deviations [0.6, -0.4, 0.4, -0.6]; unbiased var = (0.36+0.16+0.16+0.36)/3 = 1.04/3
    spo = SPOAdvantage(eps=0.0)
    spo.state["tracker"].update({"a": [0.3, 0.7], "b": [0.3, 0.7]})
    b = with_keys(make_batch([1.0, 0.0, 1.0, 0.0], [0, 1, 2, 3], [2, 1, 2, 2], T=2), ["a", "b", "c", "d"])
    std = math.sqrt(1.04 / 3)
    want = torch.tensor([[0.6, 0.6], [-0.4, 0.0], [0.4, 0.4], [-0.6, -0.6]]) / std
    assert_close(spo(b), want)


def test_tracker_update_constant_rho():
    # card test (b): rho = 0.9, alpha = beta = 1, r = 1 -> alpha = 1.9, beta = 0.9, v = 1.9/2.8 = 0.6786
    spo = SPOAdvantage(adaptive=False, rho_min=0.5, rho_max=0.9)
    spo.state["tracker"]["x"] = [1.0, 1.0]
    spo.observe(with_keys(make_batch([1.0]), ["x"]))
    a, b = spo.state["tracker"]["x"][:2]
    assert (a, b) == pytest.approx((1.9, 0.9), abs=1e-12)
    assert spo.value("x") == pytest.approx(0.678571, abs=1e-6)


def test_forgetting_factor():
    # card test (c): D = D_half -> 2^-1 = 0.5 (inside [0.4, 0.96]); clipped up to rho_min = 0.875; D = 0 -> 1 -> 0.96
    d = torch.tensor([0.06, 0.0, 0.12], dtype=torch.float64)
    assert_close(forgetting(d, 0.06, 0.4, 0.96), torch.tensor([0.5, 0.96, 0.4], dtype=torch.float64))
    assert_close(forgetting(d[:1], 0.06, 0.875, 0.96), torch.tensor([0.875], dtype=torch.float64))


def test_kl_adaptive_update_uses_actor_logprobs_after_previous_update():
    # Released recipe (issue 21): D compares the stored response's actor log-probs recomputed right after the
    # previous visit's update with the current policy's, not the sampler's log-probs.
    # Visit 1: response [5, 6], sampler log-probs [-1, -2]; after the update the actor gives [-1.1, -2.2] (stored).
    #   no stored response yet -> rho_max: alpha = 0.96 * 0.5 + 1 = 1.48, beta = 0.96 * 0.5 = 0.48
    # Visit 2: the policy now gives the stored response [-1.13, -2.29]: |d| = 0.03, 0.09 -> D = 0.06 = D_half
    #   -> rho = 0.5: alpha = 0.74, beta = 0.24 + 1 = 1.24 (reward 0). The sampler-based D would be
    #   (0.13 + 0.29) / 2 = 0.21 -> rho = 2^-3.5 = 0.088 -> rho_min 0.1.
    spo = SPOAdvantage(rho_min=0.1, rho_max=0.96)
    calls = []

    def policy(b):
        first = int(b.response_ids[0, 0])
        calls.append(first)
        return {5: torch.tensor([[-1.1, -2.2]]) if len(calls) == 1 else torch.tensor([[-1.13, -2.29]]),
                7: torch.tensor([[-0.5, -0.7]])}[first]

    first = with_keys(make_batch([1.0], T=2), ["x"])
    first = first.replace(response_ids=torch.tensor([[5, 6]]), sampler_logprobs=torch.tensor([[-1.0, -2.0]]))
    spo.observe(first, policy)
    assert spo.state["tracker"]["x"][:2] == pytest.approx([1.48, 0.48])
    assert spo.state["tracker"]["x"][3:] == [[5, 6], pytest.approx([-1.1, -2.2])]  # actor's, not the sampler's
    second = with_keys(make_batch([0.0], T=2), ["x"]).replace(response_ids=torch.tensor([[7, 8]]))
    spo.observe(second, policy)
    assert calls == [5, 5, 7]  # the stored response replayed, then the new one scored for the next visit
    assert spo.state["tracker"]["x"][:2] == pytest.approx([0.5 * 1.48, 0.5 * 0.48 + 1.0])
    assert spo.state["tracker"]["x"][3:] == [[7, 8], pytest.approx([-0.5, -0.7])]


def test_offline_initialisation(tmp_path):
    # Released recipe: alpha_0 = N_init (s + 0.5) / (N_eff + 1), beta_0 = N_init (N_eff - s + 0.5) / (N_eff + 1),
    # N_init = 1 / (1 - rho_min) = 8. Scores [1, 1, 0, 0, 0, 0, 0, 1]: s = 3, N_eff = 8
    #   -> alpha_0 = 8 * 3.5 / 9 = 3.1111, beta_0 = 8 * 5.5 / 9 = 4.8889, v_0 = 3.5 / 9 = 0.3889.
    # A prompt missing from the file keeps the Jeffreys prior (0.5, 0.5): v = 0.5.
    path = tmp_path / "offline.json"
    path.write_text(json.dumps({"x": [1, 1, 0, 0, 0, 0, 0, 1], "y": [2.0, -1.0]}))
    spo = SPOAdvantage(offline_values=str(path))
    assert spo.state["tracker"]["x"] == pytest.approx([8 * 3.5 / 9, 8 * 5.5 / 9])
    assert spo.value("x") == pytest.approx(3.5 / 9) and spo.value("new") == 0.5
    # scores are clipped to [0, 1]: y = [1, 0] -> s = 1, N_eff = 2 -> (8 * 1.5 / 3, 8 * 1.5 / 3)
    assert spo.state["tracker"]["y"] == pytest.approx([4.0, 4.0])


def test_property_agreeing_samples_still_learn():
    # card test (d): two prompts whose samples all agree -> GRPO gives 0 everywhere, SPO does not
    b = with_keys(make_batch([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1]), ["a", "a", "b", "b"])
    assert (GRPOAdvantage()(b) == 0).all()
    spo = SPOAdvantage()
    spo.state["tracker"].update({"a": [1.0, 3.0], "b": [3.0, 1.0]})
    adv = spo(b)
    assert (adv != 0).all() and (adv[:2] > 0).all() and (adv[2:] < 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(2, 9, (1,), generator=g))
    keys = [f"k{int(i)}" for i in torch.randint(0, 4, (B,), generator=g)]
    r = torch.rand(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 5, (B,), generator=g)
    spo = SPOAdvantage()
    for k in ("k0", "k2"):
        spo.state["tracker"][k] = [float(torch.rand(1, generator=g)) + 0.1, float(torch.rand(1, generator=g)) + 0.1]
    got = spo(with_keys(make_batch(r, list(range(B)), lengths, T=4), keys))
    a_hat = []
    for i in range(B):
        al, be = spo.state["tracker"].get(keys[i], [0.5, 0.5])[:2]
        a_hat.append(float(r[i]) - al / (al + be))
    mean = sum(a_hat) / B
    std = math.sqrt(sum((x - mean) ** 2 for x in a_hat) / (B - 1))
    want = torch.zeros(B, 4)
    for i in range(B):
        for t in range(int(lengths[i])):
            want[i, t] = (a_hat[i] - mean) / (std + 1e-8)
    assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_gradient_of_advantage_in_rewards():
    # A = (d - mean d) / std(d), d = r - v: dA_i/dr_j = (delta_ij - 1/B)/s - (d_i - m)(d_j - m)/((B-1) s^3)
    spo = SPOAdvantage(eps=0.0)
    spo.state["tracker"].update({"a": [0.2, 0.6]})
    keys = ["a", "b", "a", "c"]
    r0 = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    J = torch.autograd.functional.jacobian(
        lambda r: spo(with_keys(make_batch(r, [0, 1, 2, 3], dtype=torch.float64), keys))[:, 0].double(), r0)
    d = r0 - torch.tensor([0.25, 0.5, 0.25, 0.5], dtype=torch.float64)
    B, m = 4, d.mean()
    s = d.std()
    want = (torch.eye(B, dtype=torch.float64) - 1 / B) / s - torch.outer(d - m, d - m) / ((B - 1) * s**3)
    assert_close(J, want, atol=1e-6, rtol=1e-5)


def test_prioritised_weights_and_validation():
    spo = SPOAdvantage(explore=0.05)
    spo.state["tracker"].update({"easy": [9.0, 1.0], "mid": [1.0, 1.0]})
    w = spo.prompt_weights(["easy", "mid", "new"])
    assert w == pytest.approx([math.sqrt(0.9 * 0.1) + 0.05, 0.55, 0.55])
    assert SPOAdvantage(prioritize=False).prompt_weights(["x"]) is None
    for kw, key in (({"d_half": 0.0}, "d_half"), ({"rho_min": 0.99}, "rho_min"), ({"explore": -1.0}, "explore")):
        with pytest.raises(ConfigError, match=key):
            from_config(SPOAdvantage, **kw)


def test_tracker_survives_checkpoint_resume(tmp_path):
    from lmpo.config import load_config
    from lmpo.train.checkpoint import latest_checkpoint
    from lmpo.train.loop import train

    def cfg(steps):
        return load_config("configs/tiny.yaml", [
            "method=spo", f"output.dir={tmp_path}", f"train.steps={steps}", "eval.every=0", "eval.at_start=false",
            "eval.num_prompts=0", "output.checkpoint_every=1", "rollout.num_generations=1", "rollout.prompts_per_step=4",
            "output.progress=false", "output.plot=false"])

    train(cfg(2))
    state = torch.load(latest_checkpoint(tmp_path / "spo-copy-seed0") / "state.pt", weights_only=False)
    tracker = state["components"]["advantage"]["tracker"]
    assert tracker and all(len(v) == 5 and v[0] > 0 and v[1] > 0 for v in tracker.values())
    restored = SPOAdvantage()
    restored.load_state_dict(state["components"]["advantage"])
    assert restored.state_dict() == state["components"]["advantage"]
    train(cfg(3), resume=True)  # resuming loads the tracker and keeps updating it
    after = torch.load(latest_checkpoint(tmp_path / "spo-copy-seed0") / "state.pt", weights_only=False)
    assert after["step"] == 3
    assert set(tracker) <= set(after["components"]["advantage"]["tracker"])  # the step-2 trackers were restored
    assert sum(v[0] + v[1] for v in after["components"]["advantage"]["tracker"].values()) > \
        sum(v[0] + v[1] for v in tracker.values())

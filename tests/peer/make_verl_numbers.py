"""Compute verl's own outputs on fixed inputs and store them as test data (tests/data/peer/verl_*.json).

Run in an environment where ``verl.trainer.ppo.core_algos`` imports (verl installed without its GPU dependencies
runs on CPU), e.g. ``make peer-numbers`` (which builds such an environment under /tmp/verlvenv):

    python -m venv /tmp/verlvenv && /tmp/verlvenv/bin/pip install torch numpy omegaconf packaging ray tensordict \
        transformers codetiming orjson && /tmp/verlvenv/bin/pip install --no-deps verl
    /tmp/verlvenv/bin/python tests/peer/make_verl_numbers.py

It imports nothing from lmpo: the inputs are made here from fixed seeds and stored next to verl's outputs, and
tests/unit/test_peer_parity.py feeds the same stored inputs to lmpo's components. Every number is float64 except
where verl itself computes in float32 (``group_mean_std``). One case per verl function and setting; its ``verl`` key
names the function and the configuration it was called with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import verl
from verl.trainer.ppo import core_algos as ca
from verl.workers.config import ActorConfig

OUT = Path(__file__).resolve().parents[1] / "data" / "peer"
F64 = torch.float64


def lst(x: torch.Tensor):
    return x.detach().to(F64).tolist()


# --------------------------------------------------------------------------- fixed inputs
def outcome_inputs() -> dict:
    """Ten responses in four prompt groups (sizes 4, 2, 1, 3): a group of equal rewards and a singleton group;
    right-padded masks of lengths 1..6; the outcome reward sits on the last valid token (verl's layout)."""
    g = torch.Generator().manual_seed(21)
    index = [0, 0, 0, 0, 1, 1, 2, 3, 3, 3]
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.7, 0.2, -0.3, 0.9], dtype=F64)
    lengths = torch.tensor([6, 3, 4, 1, 5, 2, 3, 6, 4, 2])
    T = 6
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    token_level = torch.zeros(len(index), T, dtype=F64)
    token_level[torch.arange(len(index)), lengths - 1] = rewards
    old_lp = -torch.rand(len(index), T, generator=g, dtype=F64) * 2.0 - 0.05
    sum_pi2 = torch.rand(len(index), T, generator=g, dtype=F64) * 0.5 + 0.1
    baselines = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.2, 0.1, 0.1, 0.1], dtype=F64)
    return {"index": index, "rewards": lst(rewards), "mask": lst(mask), "token_level_rewards": lst(token_level),
            "old_logprobs": lst(old_lp), "sum_pi_squared": lst(sum_pi2), "reward_baselines": lst(baselines)}


def no_singleton(inp: dict) -> dict:
    """The same batch less its singleton group (row 6)."""
    keep = [i for i in range(len(inp["index"])) if i != 6]
    return {k: [v[i] for i in keep] for k, v in inp.items()}


def loss_inputs(seed: int, scale: float = 0.3, B: int = 5, T: int = 6) -> dict:
    """Log-probs, old log-probs (log-ratios ~ N(0, scale)), token advantages and right-padded masks (a row of
    length 1 and a full row)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2.0 - 0.05
    logr = torch.randn(B, T, generator=g, dtype=F64) * scale
    lp = (old + logr).clamp(max=-1e-3)
    adv_seq = torch.randn(B, generator=g, dtype=F64)
    adv = adv_seq[:, None].expand(B, T).clone()
    lengths = torch.tensor([T, 3, 1, 5, 4][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    ref = old + torch.randn(B, T, generator=g, dtype=F64) * 0.8
    return {"logprobs": lst(lp), "old_logprobs": lst(old), "advantages": lst(adv * mask), "mask": lst(mask),
            "ref_logprobs": lst(ref)}


def actor_config(**kw) -> ActorConfig:
    from verl.workers.config import PolicyLossConfig

    pl = kw.pop("policy_loss", None)
    if pl:
        kw["policy_loss"] = PolicyLossConfig(**pl)
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=2, ppo_mini_batch_size=4, **kw)


# --------------------------------------------------------------------------- advantages
def advantage_cases() -> list[dict]:
    base = outcome_inputs()
    cases = []

    def run(name, fn_name, inp, lmpo, **kw):
        t = {k: torch.tensor(v, dtype=F64) for k, v in inp.items() if k not in ("index",)}
        index = np.array(inp["index"])
        fn = getattr(ca, fn_name)
        args = dict(token_level_rewards=t["token_level_rewards"].clone(), response_mask=t["mask"])
        if fn_name == "compute_remax_outcome_advantage":
            args["reward_baselines"] = t["reward_baselines"]
        else:
            args["index"] = index
        if fn_name == "compute_optimal_token_baseline_advantage":
            args["old_log_probs"] = t["old_logprobs"]
            args["sum_pi_squared"] = t["sum_pi_squared"]
        config = kw.pop("config", None)
        if config is not None:
            from verl.trainer.config import AlgoConfig

            args["config"] = AlgoConfig(**config)
        adv, _ = fn(**args, **kw)
        cases.append({"name": name, "verl": {"function": fn_name, "kwargs": kw, "config": config}, "lmpo": lmpo,
                      "inputs": inp, "advantages": lst(adv)})

    for inp, tag in ((base, ""), (no_singleton(base), "_no_singleton")):
        run("grpo" + tag, "compute_grpo_outcome_advantage", inp,
            {"advantage": {"name": "grpo", "singleton": "raw"}}, norm_adv_by_std_in_grpo=True)
        run("dr_grpo" + tag, "compute_grpo_outcome_advantage", inp,
            {"advantage": {"name": "grpo", "scale_by_std": False, "singleton": "raw"}}, norm_adv_by_std_in_grpo=False)
        run("grpo_vectorized" + tag, "compute_grpo_vectorized_outcome_advantage", inp,
            {"advantage": {"name": "grpo", "singleton": "raw"}}, norm_adv_by_std_in_grpo=True)
        run("rloo" + tag, "compute_rloo_outcome_advantage", inp, {"advantage": {"name": "rloo", "singleton": "raw"}})
        run("rloo_vectorized" + tag, "compute_rloo_vectorized_outcome_advantage", inp,
            {"advantage": {"name": "rloo", "singleton": "zero"}})
        run("reinforce_pp_baseline" + tag, "compute_reinforce_plus_plus_baseline_outcome_advantage", inp,
            {"advantage": {"name": "reinforce_pp", "baseline": "group_mean", "singleton": "raw"}})
        run("gpg" + tag, "compute_gpg_outcome_advantage", inp, {"advantage": {"name": "gpg", "alpha": "nonzero_reward", "singleton": "raw"}})
        run("opo" + tag, "compute_opo_outcome_advantage", inp, {"advantage": {"name": "opo", "singleton": "raw"}})
        run("otb" + tag, "compute_optimal_token_baseline_advantage", inp,
            {"advantage": {"name": "otb", "eps": 1e-8, "singleton": "raw"}})
    # defaults agree where no group is a singleton
    for name in ("grpo", "rloo"):
        run(f"{name}_defaults_no_singleton", f"compute_{name}_outcome_advantage", no_singleton(base),
            {"advantage": {"name": name}})
    for gamma in (1.0, 0.9):
        run(f"reinforce_pp_gamma{gamma}", "compute_reinforce_plus_plus_outcome_advantage", base,
            {"advantage": {"name": "reinforce_pp", "gamma": gamma}}, config={"gamma": gamma})
    run("remax", "compute_remax_outcome_advantage", base, {"advantage": {"name": "remax"}})
    run("passk", "compute_grpo_passk_outcome_advantage", no_singleton(base),
        {"advantage": {"name": "passk", "scale_by_std": True}}, config={"norm_adv_by_std_in_grpo": True})
    run("passk_no_std", "compute_grpo_passk_outcome_advantage", no_singleton(base),
        {"advantage": {"name": "passk", "scale_by_std": False}}, config={"norm_adv_by_std_in_grpo": False})
    return cases


# --------------------------------------------------------------------------- policy losses
LOSSES = [
    # (case name, verl loss_mode, verl loss_agg_mode, ActorConfig kwargs, lmpo sections, input seed, log-ratio scale)
    ("ppo_clip_dual", "vanilla", "token-mean", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                                                "clip_ratio_c": 3.0},
     {"loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28, "dual_clip": 3.0},
      "aggregator": {"name": "token_mean"}}, 1, 0.4),
    ("ppo_clip_seq_mean_token_mean", "vanilla", "seq-mean-token-mean", {"clip_ratio": 0.2, "clip_ratio_c": 3.0},
     {"loss": {"name": "ppo_clip", "epsilon": 0.2, "dual_clip": 3.0}, "aggregator": {"name": "seq_mean_token_mean"}},
     2, 0.4),
    ("gspo", "gspo", "seq-mean-token-mean", {"clip_ratio": 0.0003, "clip_ratio_low": 0.0003, "clip_ratio_high": 0.0004},
     {"loss": {"name": "gspo", "epsilon": 0.0003, "epsilon_high": 0.0004},
      "aggregator": {"name": "seq_mean_token_mean"}}, 3, 0.002),
    ("sapo", "sapo", "seq-mean-token-mean", {"clip_ratio": 0.2, "tau_pos": 1.0, "tau_neg": 1.05},
     {"loss": {"name": "sapo", "tau_pos": 1.0, "tau_neg": 1.05}, "aggregator": {"name": "seq_mean_token_mean"}},
     4, 0.5),
    ("cispo", "cispo", "token-mean", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
     {"loss": {"name": "cispo", "epsilon": 0.2, "epsilon_high": 0.28}, "aggregator": {"name": "token_mean"}}, 5, 0.4),
    ("gpg_loss", "gpg", "token-mean", {"clip_ratio": 0.2},
     {"loss": {"name": "reinforce"}, "aggregator": {"name": "token_mean"}}, 6, 0.3),
    ("geo_mean", "geo_mean", "token-mean", {"clip_ratio": 0.4, "clip_ratio_low": 0.4, "clip_ratio_high": 0.4},
     {"loss": {"name": "gmpo", "epsilon": 0.4, "epsilon_high": 0.4}, "aggregator": {"name": "seq_mean_token_sum"}},
     7, 0.5),
    ("dppo_tv", "dppo_tv", "token-mean", {"clip_ratio": 0.15, "clip_ratio_low": 0.15, "clip_ratio_high": 0.15,
                                          "clip_ratio_c": 20.0},
     {"loss": {"name": "dppo", "divergence": "tv", "delta_low": 0.15, "delta_high": 0.15, "is_cap": 20.0},
      "aggregator": {"name": "token_mean"}}, 8, 0.6),
    ("dppo_kl", "dppo_kl", "token-mean", {"clip_ratio": 0.05, "clip_ratio_low": 0.05, "clip_ratio_high": 0.05,
                                          "clip_ratio_c": 20.0},
     {"loss": {"name": "dppo", "divergence": "kl", "delta_low": 0.05, "delta_high": 0.05, "is_cap": 20.0},
      "aggregator": {"name": "token_mean"}}, 9, 0.6),
    ("dro", "dro", "token-mean", {"clip_ratio": 0.2, "policy_loss": {"dro_beta": 0.5}},
     {"loss": {"name": "dro", "beta": 0.5}, "aggregator": {"name": "token_mean"}}, 10, 0.4),
    # KL-Cov: a ratio large enough that top-k picks several tokens (k = max(1, int(n * ratio)))
    ("kl_cov", "kl_cov", "token-mean", {"clip_ratio": 0.2, "policy_loss": {"kl_cov_ratio": 0.2, "ppo_kl_coef": 1.0}},
     {"loss": {"name": "kl_cov", "ratio": 0.2, "coef": 1.0}, "aggregator": {"name": "token_mean"}}, 11, 0.4),
    # Clip-Cov picks its tokens at random among the candidates; a ratio of 1 takes every candidate, so the result is
    # deterministic and comparable.
    ("clip_cov", "clip_cov", "token-mean", {"clip_ratio": 0.2, "policy_loss": {"clip_cov_ratio": 1.0,
                                                                                "clip_cov_lb": 0.05,
                                                                                "clip_cov_ub": 5.0}},
     {"loss": {"name": "clip_cov", "ratio": 1.0, "cov_low": 0.05, "cov_high": 5.0, "epsilon": 0.2},
      "aggregator": {"name": "token_mean"}}, 12, 0.4),
]


def loss_cases() -> list[dict]:
    cases = []
    for name, mode, agg, cfg_kw, lmpo, seed, scale in LOSSES:
        inp = loss_inputs(seed, scale)
        t = {k: torch.tensor(v, dtype=F64) for k, v in inp.items()}
        lp = t["logprobs"].clone().requires_grad_(True)
        fn = ca.get_policy_loss_fn(mode)
        torch.manual_seed(0)
        loss, _ = fn(old_log_prob=t["old_logprobs"], log_prob=lp, advantages=t["advantages"],
                     response_mask=t["mask"], loss_agg_mode=agg, config=actor_config(**cfg_kw))
        loss.backward()
        cases.append({"name": name, "verl": {"loss_mode": mode, "loss_agg_mode": agg, "config": cfg_kw},
                      "lmpo": lmpo, "inputs": inp, "loss": loss.item(), "grad": lst(lp.grad)})
    return cases


# --------------------------------------------------------------------------- aggregation and KL
AGG = {"token-mean": {"name": "token_mean"}, "seq-mean-token-mean": {"name": "seq_mean_token_mean"},
       "seq-mean-token-sum": {"name": "seq_mean_token_sum"}, "token-sum": {"name": "token_sum"},
       # verl's default loss_scale_factor is the padded width (6 here); lmpo's horizon defaults to the budget
       "seq-mean-token-sum-norm": {"name": "seq_mean_token_sum_norm", "horizon": 6}}


def aggregation_cases() -> list[dict]:
    g = torch.Generator().manual_seed(31)
    loss_mat = torch.randn(5, 6, generator=g, dtype=F64)
    lengths = torch.tensor([6, 0, 1, 4, 3])  # includes a fully masked row (not a sequence)
    mask = (torch.arange(6)[None, :] < lengths[:, None]).to(F64)
    cases = []
    for mode, lmpo in AGG.items():
        out = ca.agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=mode)
        cases.append({"name": mode, "verl": {"loss_agg_mode": mode}, "lmpo": {"aggregator": lmpo},
                      "inputs": {"loss_mat": lst(loss_mat), "mask": lst(mask)}, "loss": float(out)})
    return cases


def kl_cases() -> list[dict]:
    g = torch.Generator().manual_seed(41)
    lp = -torch.rand(4, 5, generator=g, dtype=F64) * 3.0 - 0.01
    ref = lp + torch.randn(4, 5, generator=g, dtype=F64) * 1.5
    ref[0, 0] = lp[0, 0] + 3.5  # d = -3.5: k3 = e^3.5 - 4.5 = 28.6, above verl's clamp at 10
    cases = []
    for est in ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"):
        x = lp.clone().requires_grad_(True)
        kl = ca.kl_penalty(x, ref, est)
        kl.sum().backward()
        clamp = 10.0 if est.startswith("k3") else None
        cases.append({"name": est, "verl": {"kl_penalty": est}, "lmpo": {"kl": {"estimator": est, "k3_clamp": clamp}},
                      "inputs": {"logprobs": lst(lp), "ref_logprobs": lst(ref)}, "kl": lst(kl), "grad": lst(x.grad)})
    return cases


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    head = {"peer": "verl", "version": verl.__version__, "module": "verl.trainer.ppo.core_algos",
            "torch": torch.__version__, "script": "tests/peer/make_verl_numbers.py"}
    for kind, make in (("advantages", advantage_cases), ("losses", loss_cases), ("aggregation", aggregation_cases),
                       ("kl", kl_cases)):
        path = OUT / f"verl_{kind}.json"
        path.write_text(json.dumps({**head, "cases": make()}, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

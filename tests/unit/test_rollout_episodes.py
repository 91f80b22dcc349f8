"""rollout.mode: episodes: multi-turn episodes of a text environment through the rollout stage and the trainer."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch.testing import assert_close

from lmpo.config import load_config
from lmpo.envs import run_episode
from lmpo.errors import ConfigError, DataError
from lmpo.models import build_tiny_model, response_logprobs
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.rewards.reward_set import RewardSet, RewardSpec
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.rollout.modes import build_train_generator
from lmpo.train.rollouts import RolloutContext, score


class Echo:
    """Digits only (the tiny tokenizer's alphabet): repeat the digit shown; reward 1 per right reply; ends after
    two right replies or ``turns`` replies. The start digit is the seed's last digit."""

    def __init__(self, turns: int = 3):
        self.turns = turns

    def reset(self, seed=None):
        self.t, self.right, self.digit = 0, 0, str((seed or 0) % 10)
        return self.digit + "="

    def step(self, action):
        self.t += 1
        ok = action.strip()[:1] == self.digit
        self.right += ok
        done = self.right >= 2 or self.t >= self.turns
        return self.digit + "=", float(ok), done, {"invalid_action": not action.strip()}


@pytest.fixture(autouse=True)
def echo_module(monkeypatch):
    mod = types.ModuleType("episode_envs")
    mod.Echo = Echo
    monkeypatch.setitem(sys.modules, "episode_envs", mod)


def _batch(model, tok, rows, n, *, max_turns=3, max_context=200, max_new_tokens=3, seed=0):
    gen = build_train_generator("episodes", {"env": "episode_envs:Echo", "max_turns": max_turns,
                                             "max_context_tokens": max_context}, model, tok)
    ctx = RolloutContext(generator=gen, tokenizer=tok, reward_set=RewardSet.from_specs([RewardSpec("env_return")]),
                         params=SamplingParams(max_new_tokens=max_new_tokens), num_generations=n)
    torch.manual_seed(seed)
    return score(ctx, rows, n, ctx.params)


def test_episodes_mask_observations_number_turns_and_match_the_trainer():
    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    rows = [{"prompt": "1+1", "env_seed": 3}, {"prompt": "1+1", "env_seed": 7}]
    batch = _batch(model, tok, rows, 4)
    ex, attn = batch.extras, batch.response_attn
    # one row per episode, groups = episodes of one seed, sharing their first prompt
    assert batch.batch_size == 8 and batch.group_ids.tolist() == [0] * 4 + [1] * 4
    seeds = torch.tensor([m["row"]["env_seed"] for m in batch.meta])
    assert all((seeds[batch.group_ids == g] == seeds[batch.group_ids == g][0]).all() for g in (0, 1))
    assert (batch.prompt_ids[:4] == batch.prompt_ids[0]).all() and (batch.prompt_ids[4:] == batch.prompt_ids[4]).all()
    # trained tokens = policy tokens; observation tokens are attended to but never trained
    assert torch.equal(batch.response_mask, ex["policy_mask"] & attn)
    obs = attn & ~batch.response_mask
    assert obs.any() and not (batch.response_mask & obs).any()
    assert (batch.sampler_logprobs[obs] == 0).all() and (batch.sampler_logprobs[batch.response_mask] < 0).all()
    # turn ids start at 0, never decrease, and count the policy turns
    for b in range(8):
        t = batch.turn_ids[b][attn[b]]
        assert t[0] == 0 and (t[1:] >= t[:-1]).all()
        assert int(t[batch.response_mask[b][attn[b]]].unique().numel()) == int(ex["num_turns"][b])
    # reward = episode return = sum of per-turn rewards; unfinished episodes are marked truncated
    assert_close(batch.rewards, ex["env_return"]) and assert_close(ex["env_return"], ex["turn_rewards"].sum(-1))
    assert torch.equal(batch.truncated, ex["episode_done"] == 0)
    # the sampler's log-probs are the trainer's on policy tokens (packed / prompt-once pass and plain HF pass)
    for packed in (True, False):
        lp, _ = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, attn, packed=packed,
                                  share_prompt=packed)
        m = batch.response_mask
        assert_close(batch.sampler_logprobs[m], lp[m], atol=1e-5, rtol=1e-5)
    # the same replies played through the reference loop give the same per-turn rewards
    for b in range(8):
        keep = batch.response_mask[b]
        replies = [tok.decode(batch.response_ids[b][keep & (batch.turn_ids[b] == t)].tolist(), skip_special_tokens=True)
                   for t in range(int(ex["num_turns"][b]))]
        it = iter(replies)
        ep = run_episode(Echo(), lambda msgs: next(it), seed=int(seeds[b]), max_turns=len(replies))
        assert ep.rewards == ex["turn_rewards"][b, : len(replies)].tolist()


def test_observation_keys_name_what_each_turn_saw():
    """extras["turn_observation_keys"][i, t] = observation_key of the messages turn t answered (the first observation
    without the instructions, then the environment's replies), 0 after the last turn; Echo shows its digit each turn,
    so every turn of an episode (and of its group) sees the same observation."""
    from lmpo.rollout.episodes import observation_key

    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    batch = _batch(model, tok, [{"prompt": "1+1", "env_seed": 3}, {"prompt": "1+1", "env_seed": 7}], 4, max_turns=3)
    keys, turns = batch.extras["turn_observation_keys"], batch.extras["num_turns"].long()
    assert keys.shape == (8, 3) and keys.dtype == torch.long
    for b in range(8):
        digit = str(int(batch.meta[b]["row"]["env_seed"]) % 10)
        want = observation_key([{"role": "user", "content": digit + "="}])
        assert keys[b, : turns[b]].tolist() == [want] * int(turns[b]) and (keys[b, turns[b]:] == 0).all()
    assert observation_key([{"role": "user", "content": "3="}]) != observation_key([{"role": "tool", "content": "3="}])
    assert observation_key([{"role": "user", "content": "3="}]) > 0


def test_answer_confidence_is_the_teacher_forced_answer_probability_at_each_turn_start():
    """mode_params.answer_confidence: C[i, t] = geometric-mean probability of the row's answer tokens after the first
    prompt and the response so far at the start of turn t (IGPO), checked against a plain forward of the model."""
    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    gen = build_train_generator("episodes", {"env": "episode_envs:Echo", "max_turns": 3, "max_context_tokens": 200,
                                             "answer_confidence": True}, model, tok)
    ctx = RolloutContext(generator=gen, tokenizer=tok, reward_set=RewardSet.from_specs([RewardSpec("env_return")]),
                         params=SamplingParams(max_new_tokens=2), num_generations=3)
    torch.manual_seed(1)
    batch = score(ctx, [{"prompt": "1+1", "env_seed": 3, "answer": "37"}], 3, ctx.params)
    conf, turns = batch.extras["turn_answer_confidence"], batch.extras["num_turns"].long()
    ans = tok("37", add_special_tokens=False)["input_ids"]
    for b in range(3):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b]].tolist()
        resp = batch.response_ids[b][batch.response_attn[b]].tolist()
        tid = batch.turn_ids[b][batch.response_attn[b]].tolist()
        for t in range(int(turns[b])):
            start = tid.index(t) if t > 0 else 0
            ids = torch.tensor([prompt + resp[:start] + ans])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            want = math.exp(sum(float(lp[len(ids[0]) - len(ans) - 1 + j, a]) for j, a in enumerate(ans)) / len(ans))
            assert float(conf[b, t]) == pytest.approx(want, rel=1e-4)
        assert (conf[b, turns[b]:] == 0).all()
    with pytest.raises(DataError, match="answer"):
        score(ctx, [{"prompt": "1+1", "env_seed": 3}], 2, ctx.params)  # no answer anywhere


def test_context_budget_and_turn_limit_end_episodes():
    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    rows = [{"prompt": "1", "env_seed": 1}]
    batch = _batch(model, tok, rows, 3, max_turns=1)
    assert (batch.extras["num_turns"] == 1).all() and (batch.turn_ids == 0).all()
    assert not (batch.response_attn & ~batch.response_mask).any()  # no observation after the last turn
    batch = _batch(model, tok, rows, 3, max_turns=8, max_context=12)
    total = batch.prompt_mask.sum(-1) + batch.response_attn.sum(-1)
    assert (total <= 12).all()


def test_chat_template_observations_close_the_turn_once():
    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %} {% endif %}")
    gen = build_train_generator("episodes", {"env": "episode_envs:Echo"}, model, tok)
    hist = [{"role": "user", "content": "1="}]
    new = [{"role": "user", "content": "2="}]
    assert gen._observation_text(hist, new, None, ended_with_eos=True) == "2=<eos> "
    assert gen._observation_text(hist, new, None, ended_with_eos=False) == "<eos>2=<eos> "
    batch = _batch(model, tok, [{"prompt": "1", "env_seed": 4}], 3)
    lp, _ = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_attn)
    assert_close(batch.sampler_logprobs[batch.response_mask], lp[batch.response_mask], atol=1e-5, rtol=1e-5)
    eos = batch.response_ids == 1
    assert (eos & ~batch.response_mask).any()  # the template's turn ends are observation tokens


def test_generator_takes_token_ids():
    model, tok = build_tiny_model(seed=0), build_tiny_tokenizer()
    gen = HFGenerator(model, tok)
    torch.manual_seed(0)
    a = gen.generate(["12=", "3="], SamplingParams(max_new_tokens=4, greedy=True))
    b = gen.generate([tok("12=")["input_ids"], tok("3=")["input_ids"]], SamplingParams(max_new_tokens=4, greedy=True))
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.response_ids, b.response_ids)


def test_config_errors_and_env_return_without_episodes():
    with pytest.raises(ConfigError, match="max_turn"):
        load_config(None, ["rollout.mode=episodes", "rollout.mode_params={max_turn: 2}"])
    with pytest.raises(ConfigError, match="frozenlak"):
        load_config(None, ["rollout.mode=episodes", "rollout.mode_params={env: frozenlak}"])
    with pytest.raises(ConfigError, match="max_turns must be >= 1"):
        load_config(None, ["rollout.mode=episodes", "rollout.mode_params={env: 'episode_envs:Echo', max_turns: 0}"])
    rewards = RewardSet.from_specs([RewardSpec("env_return")])
    with pytest.raises(Exception, match="rollout.mode: episodes"):
        rewards(["p"], ["c"], {})
    cfg = load_config("configs/agent-frozenlake.yaml", [])
    assert cfg.rollout.mode == "episodes" and cfg.task.name == "env"


def test_training_on_episodes_runs_and_logs_episode_metrics(tmp_path):
    cfg = load_config("configs/tiny.yaml", [
        "task.name=env", "task.params={num_train: 16, num_eval: 2, instructions: '1+1'}",
        "rollout.mode=episodes", "rollout.mode_params={env: 'episode_envs:Echo', max_turns: 3, max_context_tokens: 64}",
        "rollout.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=3",
        "train.steps=2", "eval.every=2", f"output.dir={tmp_path}", "output.checkpoint_every=0", "output.progress=false",
    ])
    result = train_run(cfg)
    last = result.history[-1]
    for key in ("rollout/env_return", "rollout/num_turns", "rollout/policy_token_frac", "eval/turns",
                "reward/env_return"):
        assert key in last and last[key] == last[key], key
    assert 0 < last["rollout/policy_token_frac"] < 1


def train_run(cfg):
    from lmpo.train.loop import train

    return train(cfg)


def test_length_constants_count_every_policy_turn():
    from lmpo.config import build_components

    cfg = load_config(None, ["method=dr_grpo", "rollout.max_new_tokens=5", "rollout.mode=episodes",
                             "rollout.mode_params={env: 'episode_envs:Echo', max_turns: 3}"])
    assert build_components(cfg)["aggregator"].horizon == 15


def test_rows_without_an_episode_seed_are_refused():
    from lmpo.errors import DataError

    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    with pytest.raises(DataError, match="integer episode seed"):
        _batch(model, tok, [{"prompt": "1=", "answer": "1"}], 2)

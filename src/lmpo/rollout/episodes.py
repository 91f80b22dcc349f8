"""``rollout.mode: episodes``: multi-turn rollouts of a text environment (:mod:`lmpo.envs`) through the trainer.

For each task row (its ``env_seed`` column; a group is several episodes from the same seed, so the same start) the
generator resets a fresh environment, then alternates until the environment says done, ``max_turns`` policy turns,
or the context budget ``max_context_tokens`` (prompt + response tokens):

1. a policy turn: the plain sampler (:class:`lmpo.rollout.hf.HFGenerator`), batched over the episodes still
   running, continues each episode's exact token ids (never re-tokenised, so the trainer sees what was sampled);
2. an environment turn: ``checked_step(env, reply)``; the observation's chat messages
   (:func:`lmpo.envs.observation_messages`) are rendered with the tokenizer's chat template and their tokens (the
   end of the assistant turn, the observation, the next generation prompt) are appended.

The first prompt is the chat ``[system: env.system_prompt] + [user: row prompt + first observation]`` with the
environment's tools rendered by the template (``tools=``) or, for templates that do not render tools, written into
the system prompt (:func:`lmpo.tools.tools_system_prompt`). Without a chat template (the tiny test tokenizer),
messages are joined by newlines as :func:`lmpo.models.load.format_prompt` does.

One row per episode: ``response_ids`` are all tokens after the first prompt (policy and observation tokens),
``response_attn`` True on all of them (the trainer attends to observations), ``sampler_logprobs`` the sampler's on
policy tokens and 0 on observation tokens. Batch fields (``ModeOutput.batch_fields``): ``response_mask`` (policy
tokens only: observation tokens are never trained) and ``turn_ids`` (policy turn t and the observation that answers
it carry t; 0 on padding). Extras: ``policy_mask``, ``env_return`` (B,), ``turn_rewards`` (B, max_turns),
``turn_observation_keys`` (B, max_turns; see :func:`observation_key`), ``num_turns``, ``episode_done``,
``invalid_actions``, ``tool_calls``, ``invalid_tool_calls`` (malformed, unknown tool or bad arguments), ``tool_errors``
(valid calls whose tool raised or timed out) (B,), ``turn_tool_calls`` (B, max_turns: the tool calls each policy turn
made, 0 after the episode's last turn), and with ``answer_confidence`` ``turn_answer_confidence`` (B, max_turns;
:meth:`EpisodeGenerator.answer_confidence`). Reward columns
(``ModeOutput.columns``): ``env_return`` (read by the ``env_return`` reward) and ``env_turns``. ``truncated`` marks
episodes that did not finish (turn limit or context budget).

The trainer's fast paths apply unchanged: a response is one contiguous run of attended tokens, so the packed forward
covers it, and a group's rows share their first prompt, so prompt-once (in the sampler's first turn and in the
trainer's passes) shares it; later turns' prompts differ per episode and are prefilled per row.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch

from lmpo.envs import build_env, checked_reset, checked_step, observation_messages
from lmpo.errors import ConfigError, DataError
from lmpo.models.logprobs import split_body_and_head
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.rollout.reference import ModeOutput
from lmpo.tools.base import template_renders_tools, tools_system_prompt

_SENTINEL = "\u2063LMPO-ASSISTANT-TURN\u2063"  # stands for a reply when the template renders the turn after it


def observation_key(messages: list[dict]) -> int:
    """A stable positive 63-bit key of the observation a policy turn answers (the roles and contents of its chat
    messages): equal observations, within a run and across runs, give equal keys; 0 is never a key.

    ``extras["turn_observation_keys"][i, t]`` is the key of what episode i's turn t saw: the first observation
    (without the task's instructions) for t = 0, the environment's answer to turn t - 1 after; 0 where episode i
    has no turn t. Turn-level credit methods group steps by it (GiGPO's anchor states)."""
    text = "\x1e".join(f"{m.get('role', '')}\x1f{m.get('content', '')}" for m in messages)
    return (int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1) | 1


@dataclass(frozen=True)
class EpisodeOptions:
    """``rollout.mode_params`` of the episodes mode.

    Attributes:
        env: A registered environment (``frozenlake``, ``gymnasium``) or ``"package.module:Class"``.
        env_params: Its parameters (one fresh environment per episode).
        max_turns: At most this many policy turns per episode.
        max_context_tokens: At most this many prompt + response tokens per episode; a turn never starts with less
            than one token of room, and an observation that does not fit ends the episode.
        seed_column: Row key holding the episode seed (an integer; every row needs one).
        answer_confidence: Also record ``extras["turn_answer_confidence"]`` (B, max_turns): the policy's probability
            of the episode's ground-truth answer at the start of each turn (IGPO's information gain; one
            teacher-forced forward per turn, see :meth:`EpisodeGenerator.answer_confidence`). The answer is the
            environment's ``answer`` attribute after ``reset`` or else the row's ``answer`` column.
    """

    env: str = "frozenlake"
    env_params: dict = field(default_factory=dict)
    max_turns: int = 8
    max_context_tokens: int = 2048
    seed_column: str = "env_seed"
    answer_confidence: bool = False

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ConfigError(f"rollout.mode_params.max_turns must be >= 1, got {self.max_turns}.")
        if self.max_context_tokens < 2:
            raise ConfigError(f"rollout.mode_params.max_context_tokens must be >= 2, got {self.max_context_tokens}.")
        if not isinstance(self.env_params, dict):
            raise ConfigError(f"rollout.mode_params.env_params must be a mapping, got {self.env_params!r}.")
        self.make_env()  # an unknown environment or bad parameters fail when the config is loaded

    def make_env(self):
        return build_env(self.env, **self.env_params)


class EpisodeGenerator(HFGenerator):
    """Multi-turn episodes of an environment, one row per episode (module docstring)."""

    wants_rows = True
    plays_episodes = True  # held-out evaluation plays episodes too: the task exists only through the environment

    def __init__(self, model, tokenizer, options: EpisodeOptions, batch_size=None, autocast=None,
                 sampler=None) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size, autocast=autocast)
        self.options = options
        self.sampler = sampler  # the engine of each policy turn (rollout.backend); None = lmpo's own decode loop

    def sync_weights(self) -> None:
        if self.sampler is not None:
            self.sampler.sync_weights()

    def _turn(self, prompts: list[list[int]], params: SamplingParams, limits: list[int]):
        if self.sampler is not None:
            return self.sampler.generate(prompts, params, max_new_tokens=limits)
        return HFGenerator.generate(self, prompts, params, max_new_tokens=limits)

    # ------------------------------------------------------------------ chat rendering
    def _render(self, messages: list[dict], tools: list[dict] | None, generation: bool) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            kw = {"tools": tools} if tools else {}
            return tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False, **kw)
        return "\n".join(str(m["content"]) for m in messages)

    def _observation_text(self, history: list[dict], new: list[dict], tools: list[dict] | None,
                          ended_with_eos: bool) -> str:
        """The text after a reply: the end of the assistant turn, the observation messages ``new`` and the next
        generation prompt, as the chat template writes them (the reply itself is never re-rendered)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return "\n" + "\n".join(str(m["content"]) for m in new)
        full = self._render(history + [{"role": "assistant", "content": _SENTINEL}] + new, tools, True)
        at = full.rfind(_SENTINEL)
        if at < 0:
            raise DataError("rollout.mode=episodes: the chat template dropped the last assistant turn's content; "
                            "cannot tell where the observation starts.")
        text = full[at + len(_SENTINEL):]
        if ended_with_eos:  # the sampled EOS already closes the turn
            for eos in self.eos_ids:
                end = self.tokenizer.decode([eos])
                if end and text.startswith(end):
                    return text[len(end):]
        return text

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    # ------------------------------------------------------------------ the rollout
    def generate(self, prompts: list[str], params: SamplingParams, rows: list[dict] | None = None,
                 max_new_tokens: list[int] | None = None) -> ModeOutput:
        o = self.options
        if rows is None or len(rows) != len(prompts):
            raise DataError("rollout.mode=episodes needs the task rows (with their env seeds) per prompt.")
        n = len(rows)
        limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * n
        envs = [o.make_env() for _ in range(n)]
        tools: list[list[dict] | None] = []
        histories: list[list[dict]] = []
        prompt_ids: list[list[int]] = []
        keys: list[list[int]] = [[] for _ in range(n)]
        answers: list[str | None] = []
        for j, (env, row) in enumerate(zip(envs, rows)):
            seed = row.get(o.seed_column)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise DataError(f"rollout.mode=episodes: a task row has {o.seed_column}={seed!r}; every row needs an "
                                f"integer episode seed in {o.seed_column!r} (the `env` task writes one; or set "
                                "rollout.mode_params.seed_column).")
            obs = checked_reset(env, seed)
            keys[j].append(observation_key(observation_messages(obs)))
            answer = getattr(env, "answer", None)
            answers.append(str(answer) if answer is not None else (str(row["answer"]) if row.get("answer") is not None
                                                                  else None))
            schemas = list(env.tools.schemas) if getattr(env, "tools", None) is not None else None
            renders = bool(schemas) and template_renders_tools(self.tokenizer)
            if schemas and callable(getattr(env, "system_prompt_for", None)):  # the env writes its tools itself
                system = env.system_prompt_for(renders) or row.get("system_prompt") or ""
                schemas = schemas if renders else None
            else:
                system = getattr(env, "system_prompt", None) or row.get("system_prompt") or ""
                if schemas and not renders:
                    system, schemas = tools_system_prompt(schemas, system), None
            instructions = row.get("prompt") if isinstance(row.get("prompt"), str) else ""
            messages = ([{"role": "system", "content": system}] if system else [])
            messages += [dict(m) for m in getattr(env, "examples", None) or []]  # a worked exchange, if the env has one
            messages.append({"role": "user", "content": f"{instructions}\n\n{obs}" if instructions.strip() else obs})
            tools.append(schemas)
            histories.append(messages)
            prompt_ids.append(self._encode_text(self._render(messages, schemas, True)))
        too_long = [i for i, p in enumerate(prompt_ids) if len(p) >= o.max_context_tokens]
        if too_long:
            raise DataError(f"rollout.mode=episodes: first prompt(s) {too_long[:5]} have {len(prompt_ids[too_long[0]])} "
                            f"tokens, no room under rollout.mode_params.max_context_tokens={o.max_context_tokens}.")
        resp: list[list[int]] = [[] for _ in range(n)]
        policy: list[list[bool]] = [[] for _ in range(n)]
        turn: list[list[int]] = [[] for _ in range(n)]
        logp: list[list[float]] = [[] for _ in range(n)]
        rewards: list[list[float]] = [[] for _ in range(n)]
        done = [False] * n
        invalid = [0.0] * n
        calls = [0.0] * n
        bad_calls = [0.0] * n
        turn_calls: list[list[float]] = [[] for _ in range(n)]
        tool_errors = [0.0] * n
        running = list(range(n))
        starts: list[list[int]] = [[] for _ in range(n)]  # response length at the start of each turn
        for t in range(o.max_turns):
            room = {i: min(limits[i], o.max_context_tokens - len(prompt_ids[i]) - len(resp[i])) for i in running}
            running = [i for i in running if room[i] >= 1]
            if not running:
                break
            for i in running:
                starts[i].append(len(resp[i]))
            out = self._turn([prompt_ids[i] + resp[i] for i in running], params, [room[i] for i in running])
            ids, attn, lps = out.response_ids.cpu(), out.response_attn.cpu(), out.sampler_logprobs.cpu()
            still = []
            for j, i in enumerate(running):
                toks = ids[j][attn[j]].tolist()
                resp[i] += toks
                policy[i] += [True] * len(toks)
                turn[i] += [t] * len(toks)
                logp[i] += lps[j][attn[j]].tolist()
                reply = out.completions[j]
                step = checked_step(envs[i], reply)
                rewards[i].append(step.reward)
                invalid[i] += float(bool(step.info.get("invalid_action")))
                tm = step.info.get("tool_metrics") or {}
                calls[i] += float(tm.get("calls", 0))
                turn_calls[i].append(float(tm.get("calls", 0)))
                bad_calls[i] += float(tm.get("calls", 0)) - float(tm.get("valid", tm.get("calls", 0)))
                tool_errors[i] += float(tm.get("errors", 0)) + float(tm.get("timeouts", 0))
                histories[i].append(step.info.get("assistant_message") or {"role": "assistant", "content": reply})
                if step.done:
                    done[i] = True
                    continue
                if t == o.max_turns - 1:
                    continue  # no policy turn follows: the last observation would be trained on by nobody
                new = observation_messages(step.observation, step.info)
                obs = self._encode_text(self._observation_text(histories[i][:-1], new, tools[i],
                                                               ended_with_eos=not bool(out.truncated[j])))
                if len(prompt_ids[i]) + len(resp[i]) + len(obs) >= o.max_context_tokens:
                    continue  # the context budget: no room for the observation and a reply
                histories[i] += new
                keys[i].append(observation_key(new))
                resp[i] += obs
                policy[i] += [False] * len(obs)
                turn[i] += [t] * len(obs)
                logp[i] += [0.0] * len(obs)
                still.append(i)
            running = still
        result = self._output(prompt_ids, resp, policy, turn, logp, rewards, done, invalid, calls, bad_calls, keys,
                              turn_calls, tool_errors)
        if o.answer_confidence:
            result.extras["turn_answer_confidence"] = self.answer_confidence(prompt_ids, resp, starts, answers)
        return result

    def answer_confidence(self, prompt_ids: list[list[int]], resp: list[list[int]], starts: list[list[int]],
                          answers: list[str | None]) -> torch.Tensor:
        """(B, max_turns) float32: C_{i,t} = exp(mean_j log pi(a_j | context at the start of turn t, a_<j)), the
        geometric-mean probability of episode i's answer tokens a teacher-forced after everything before its turn t
        (the first prompt for t = 0; after turn t - 1's reply and observation otherwise); 0 for turns not played."""
        o = self.options
        missing = [i for i, a in enumerate(answers) if a is None or not str(a).strip()]
        if missing:
            raise DataError(f"rollout.mode_params.answer_confidence: episode(s) {missing[:5]} have no ground-truth "
                            "answer; the environment must set an `answer` attribute in reset() or the task rows an "
                            "`answer` column.")
        ans = [self._encode_text(str(a)) for a in answers]
        seqs, where = [], []
        for i in range(len(resp)):
            for t, start in enumerate(starts[i]):
                seqs.append(prompt_ids[i] + resp[i][:start] + ans[i])
                where.append((i, t, len(ans[i])))
        conf = torch.zeros(len(resp), o.max_turns, dtype=torch.float32)
        if not seqs:
            return conf
        model = self.model
        device = split_body_and_head(model)[1].weight.device
        width = max(len(q) for q in seqs)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs], dtype=torch.long, device=device)
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], dtype=torch.long, device=device)
        amp = (torch.autocast(device.type, dtype=getattr(torch, self.autocast)) if self.autocast
               else contextlib.nullcontext())
        with torch.no_grad(), amp:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, -1)
        for row, (q, (i, t, L)) in enumerate(zip(seqs, where)):
            end = len(q)
            pos = torch.arange(end - L - 1, end - 1, device=device)  # logits that predict the answer tokens
            lp = logp[row, pos, ids[row, end - L:end]]
            conf[i, t] = float(torch.exp(lp.mean()))
        return conf

    def _output(self, prompt_ids, resp, policy, turn, logp, rewards, done, invalid, calls, bad_calls,
                keys, turn_calls, tool_errors) -> ModeOutput:
        device = split_body_and_head(self.model)[1].weight.device
        prompt_ids_t, prompt_mask = self._encode(prompt_ids, device)
        pad = int(self.tokenizer.pad_token_id)
        T = max(1, max(len(r) for r in resp))

        def right(rows: list[list], value, dtype) -> torch.Tensor:
            return torch.tensor([list(r) + [value] * (T - len(r)) for r in rows], dtype=dtype, device=device)

        response_ids = right(resp, pad, torch.long)
        attn = right([[True] * len(r) for r in resp], False, torch.bool)
        policy_mask = right(policy, False, torch.bool)
        turn_ids = right(turn, 0, torch.long)
        returns = [float(sum(r)) for r in rewards]
        max_turns = self.options.max_turns
        turn_rewards = torch.tensor([r + [0.0] * (max_turns - len(r)) for r in rewards], dtype=torch.float32)
        turn_tool_calls = torch.tensor([c + [0.0] * (max_turns - len(c)) for c in turn_calls], dtype=torch.float32)
        # the key of turn t's observation; a turn that never happened has none (0)
        obs_keys = torch.tensor([k[:len(r)] + [0] * (max_turns - len(k[:len(r)])) for k, r in zip(keys, rewards)],
                                dtype=torch.long)
        completions = [self.tokenizer.decode(r, skip_special_tokens=True) for r in resp]
        f32 = dict(dtype=torch.float32)
        return ModeOutput(
            prompt_ids=prompt_ids_t, prompt_mask=prompt_mask, response_ids=response_ids, response_attn=attn,
            sampler_logprobs=right(logp, 0.0, torch.float32), truncated=torch.tensor([not d for d in done]),
            completions=completions, num_generated_tokens=int(policy_mask.sum()),
            extras={"policy_mask": policy_mask, "env_return": torch.tensor(returns, **f32), "turn_rewards": turn_rewards,
                    "turn_observation_keys": obs_keys,
                    "num_turns": torch.tensor([float(len(r)) for r in rewards]),
                    "episode_done": torch.tensor([float(d) for d in done]),
                    "invalid_actions": torch.tensor(invalid, **f32), "tool_calls": torch.tensor(calls, **f32),
                    "invalid_tool_calls": torch.tensor(bad_calls, **f32), "turn_tool_calls": turn_tool_calls,
                    "tool_errors": torch.tensor(tool_errors, **f32)},
            batch_fields={"response_mask": policy_mask, "turn_ids": turn_ids},
            columns={"env_return": returns, "env_turns": [len(r) for r in rewards]},
        )

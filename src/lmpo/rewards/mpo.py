"""MPO: Kim, Park, Raheja, Kang, "Toward Evaluative Thinking: Meta Policy Optimization with Evolving Reward Models"
(2025), arXiv:2504.20157: the meta reward model and the time-indexed rubric (the paper's section and equation
numbers were not verified here: its full text was not available; the objective below is the method card's and the
procedure is read from the authors' released code, github.com/minnesotanlp/mpo, ``trl/extras/mpo/__init__.py``
``MetaRewardModel.meta_evaluate_and_update``, ``rm_essay_writing.py`` and ``trl/trainer/mpo_trainer.py``).

The policy is trained against an LLM judge whose evaluation rubric p_k changes during training: phase k maximises
E[R_{p_k}(x, y)] - beta KL, and every ``interval`` policy steps a meta reward model (MRM) rewrites the rubric,

    p_{k+1} = MRM(task, p_k, {(x_j, y_j, R_{p_k}(x_j, y_j))}_{j in S}),   S: ``num_samples`` of the phase's samples

in three stages, as in the released ``meta_evaluate_and_update``: (1) meta-analysis, one per sample (is the score
inflated or deflated, which criterion was exploited or missed); (2) meta-refinement, in the same context, a full
rubric of ``<item>`` criteria per sample; (3) merging, the refinements (joined under a word limit) combined into
one rubric, whose items are de-duplicated. The judge scores a reply as the sum over rubric items of its score for
that item (the released RM: one integer per item, summed). No gradient reaches the judge or the MRM.

``rewards: [{name: mpo_judge, rubric: [...], judge: {model: default}, meta_model: default}]``; the judge's template
must contain ``{rubric_item}`` (scored item by item and summed, the paper's form) or ``{rubric}`` (the whole rubric,
one verdict). ``meta_backend: "module:function"`` (texts -> texts) replaces the MRM model, like ``judge.backend``.

State (``Stateful``, saved in every checkpoint as ``reward:<name>`` and restored on ``--resume``): the rubric items,
its version, counters, and the phase's sample reservoir. The trainer calls ``after_step`` once per training step
with the step's first-round samples and their scores under the rubric that scored them (so a batch is always scored
by the rubric in force when it was generated; an update applies from the next collection on).

Fidelity: reconstructed. Taken from the released code: the three stages, the schedule (``num_mpo_interval`` 10,
``num_mpo_samples`` 20 samples drawn uniformly from the phase's rollouts, which are then discarded), the merge input
word limit (25000 / 1.5 words), per-item summed scoring, item de-duplication. Ours: the prompt wording (lmpo's own,
overridable: ``analyze_template``, ``refine_template``, ``merge_template``); one free generation per stage parsed
for ``<item>`` blocks instead of the code's constrained decoding (count, then item by item, ``\\d+`` scores); each
rubric item judged in its own call instead of one multi-turn dialogue; the uniform sample is a seeded reservoir
(resumable); the bound ``max_items`` / ``max_item_chars`` (the code is bounded only by the MRM's context); the
optional pre-screening stage (off in the released runs) is not implemented. A meta step whose outputs hold no
``<item>`` block, or whose generation timed out, keeps the rubric and is counted (``meta_failures``), or raises
with ``on_meta_failure: error``.
"""

from __future__ import annotations

import random
import re
import string
import threading
from dataclasses import dataclass, field
from typing import Any

from lmpo.errors import ConfigError, RewardError
from lmpo.methods.base import Stateful
from lmpo.methods.params import hp
from lmpo.registry import REWARDS

TEMPLATE = ("Score the reply against one criterion of a rubric.\nPrompt: {prompt}\nReply: {completion}\n"
            "Criterion:\n{rubric_item}\nAnswer with the points the reply earns for this criterion, a number only.\n")
ANALYZE = ("You supervise a judge that scores replies during training. Check whether the judge's score of the reply "
           "below is right: a reply that scores well without doing the task (reward hacking) or a good reply that "
           "scores badly means the rubric must change.\n\nTask: {task_description}\nPrompt: {prompt}\n"
           "Reply: {completion}\nJudge's rubric:\n{rubric}\nJudge's score: {score}\n\n"
           "In at most {max_words} words: is the score right, which criteria were exploited or missed, and how "
           "should the rubric change?\n")
REFINE = ("Now write the improved rubric: at most {max_items} criteria, each in its own <item>...</item> block "
          "saying how many points to award or deduct and when. Keep what works, close what was exploited, add "
          "what is missing.\n")
MERGE = ("Below are {n} proposed rubrics for the same judge, separated by \"===\". Merge them into one rubric "
         "without repeated or overlapping criteria, at most {max_items} criteria, each in its own <item>...</item> "
         "block.\n\n{rubrics}\n")
FAILURE_MODES = ("keep", "error")
_ITEM = re.compile(r"<item>(.*?)</item>", re.DOTALL)


def parse_items(text: str | None) -> list[str]:
    """The ``<item>`` blocks of an MRM output, stripped, empty ones (and an echoed ``<item>...</item>``) dropped,
    de-duplicated in order (the released code de-duplicates the merged items with a set)."""
    return list(dict.fromkeys(m.strip() for m in _ITEM.findall(text or "") if m.strip().strip(".")))


def render_rubric(items: list[str]) -> str:
    return "<rubric>\n" + "\n".join(f"<item>\n{x}\n</item>" for x in items) + "\n</rubric>"


def join_under_word_limit(parts: list[str], limit: int, sep: str = "\n===\n") -> str:
    """The leading ``parts`` whose whitespace-separated words total at most ``limit`` (the released code's rule)."""
    kept, words = [], 0
    for p in parts:
        n = len(p.split())
        if words + n > limit:
            break
        kept.append(p)
        words += n
    return sep.join(kept)


PRESETS = {
    # MPO (arXiv:2504.20157; the released MPOConfig and launch scripts): PPO (GAE gamma 1, lambda 0.95, clip 0.2,
    # value coefficient 0.1, 4 PPO epochs, KL coefficient 0.02 in the reward) against the evolving judge; the MRM rewrites the
    # rubric every 10 steps from 20 samples. Set the rubric, the task description and the judge / MRM models.
    "mpo_judge": {
        "advantage": {"name": "gae", "gamma": 1.0, "lam": 0.95, "whiten": True},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.02, "estimator": "k1", "mode": "reward"},
        "critic": {"model": "shared", "vf_coef": 0.1, "cliprange_value": 0.2},
        "train": {"ppo_epochs": 4},
        "rewards": [{"name": "mpo_judge", "interval": 10, "num_samples": 20}],
    },
}


@REWARDS.register("mpo_judge", paper="Toward Evaluative Thinking: Meta Policy Optimization with Evolving Reward "
                  "Models", arxiv="2504.20157", fidelity="reconstructed")
@dataclass(eq=False)
class MPOJudge(Stateful):
    """A judge whose rubric a meta reward model rewrites every ``interval`` steps (module docstring).

    Attributes:
        rubric: The initial rubric: a list of criteria (or one string).
        judge: The ``judge`` reward's options (``model`` or ``backend``, ``parse``, ``max_score``, ...); its
            ``template`` must hold ``{rubric_item}`` or ``{rubric}`` (default: item by item, parse ``number``).
        meta_model, meta_backend: The MRM: any model spec, or ``"module:function"`` (texts -> texts).
        interval: Policy steps per phase (the released default 10).
        num_samples: Samples of the phase shown to the MRM (the released default 20).
        task_description: What the policy is asked to do, shown to the MRM.
        max_items, max_item_chars: Bound on the rubric: items past ``max_items`` dropped, items cut at
            ``max_item_chars`` (both counted).
        max_words: The analysis length asked of the MRM (released: 1000).
        merge_words: The refinements joined for the merge, up to this many words (released: 25000 / 1.5).
        meta_max_new_tokens, meta_batch_size, meta_timeout_s, meta_chat: The MRM's generation.
        analyze_template, refine_template, merge_template: The three stages' prompts (``str.format`` fields as in
            the defaults).
        on_meta_failure: ``keep`` (the rubric stays, the failure is counted) | ``error``.
        seed, device, dtype: As for ``judge``.
    """

    rubric: Any = "Score 1 if the reply does what the prompt asks, else 0."
    judge: dict = field(default_factory=dict)
    meta_model: str = "default"
    meta_backend: str | None = None
    interval: int = hp(10, ge=1)
    num_samples: int = hp(20, ge=1)
    task_description: str = ""
    max_items: int = hp(10, ge=1)
    max_item_chars: int = hp(2000, ge=1)
    max_words: int = hp(1000, ge=1)
    merge_words: int = hp(16666, ge=1)
    meta_max_new_tokens: int = hp(1024, ge=1)
    meta_batch_size: int = hp(4, ge=1)
    meta_timeout_s: float | None = hp(None, gt=0)
    meta_chat: bool = True
    analyze_template: str = ANALYZE
    refine_template: str = REFINE
    merge_template: str = MERGE
    on_meta_failure: str = hp("keep", choices=FAILURE_MODES)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from lmpo.rewards.judge import Judge

        items = [self.rubric] if isinstance(self.rubric, str) else self.rubric
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(x, str) and x.strip()
                                                                         for x in items):
            raise ConfigError(f"mpo_judge: rubric must be a non-empty criterion or list of them, got {self.rubric!r}.")
        if len(items) > self.max_items:
            raise ConfigError(f"mpo_judge: the initial rubric has {len(items)} items, above "
                              f"max_items={self.max_items}.")
        self._items0 = [x.strip() for x in items]
        if not isinstance(self.judge, dict):
            raise ConfigError(f"mpo_judge: judge must be a mapping of the judge reward's options, got {self.judge!r}.")
        kw = {"template": TEMPLATE, "parse": "number", **self.judge}
        fields = {f for _, f, _, _ in string.Formatter().parse(kw["template"]) if f}
        self.per_item = "rubric_item" in fields
        if not self.per_item and "rubric" not in fields:
            raise ConfigError("mpo_judge: judge.template must contain {rubric_item} (each criterion scored and "
                              f"summed) or {{rubric}} (the whole rubric at once); got {kw['template']!r}.")
        sample = {"task_description": "", "prompt": "", "completion": "", "rubric": "", "score": "", "max_words": 1,
                  "max_items": 1, "n": 1, "rubrics": ""}
        for key in ("analyze_template", "refine_template", "merge_template"):
            try:
                getattr(self, key).format(**sample)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"mpo_judge: {key} cannot be filled ({type(exc).__name__}: {exc}); its fields are "
                                  f"{', '.join('{' + k + '}' for k in sample)} (write {{{{ and }}}} for braces).") from None
        self.scorer = REWARDS.build("judge", where="mpo_judge.judge", **kw)
        self.meta = Judge(template="{completion}", model=self.meta_model, backend=self.meta_backend, cache_size=0,
                          max_new_tokens=self.meta_max_new_tokens, batch_size=self.meta_batch_size,
                          timeout_s=self.meta_timeout_s, chat=self.meta_chat, seed=self.seed, device=self.device,
                          dtype=self.dtype)
        self._lock = threading.Lock()  # train.async scores in another thread than after_step
        self._stats: dict[str, float] = {}
        self.scored_version = 0
        self.last_meta: dict[str, Any] = {}  # the last meta step's prompts and outputs (not checkpointed)

    def initial_state(self) -> dict[str, Any]:
        return {"rubric": list(self._items0), "version": 0, "steps": 0, "seen": 0, "buffer": [], "meta_steps": 0,
                "refinements": 0, "meta_failures": 0}

    # ------------------------------------------------------------------ the reward R_{p_k}
    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        with self._lock:
            items, self.scored_version = list(self.state["rubric"]), self.state["version"]
        b = len(completions)
        if not self.per_item:
            return self.scorer(prompts, completions, rubric=[render_rubric(items)] * b, **columns)
        total = [0.0] * b
        for item in items:
            got = self.scorer(prompts, completions, rubric_item=[item] * b, **columns)
            total = [t + g for t, g in zip(total, got)]
        return total

    # ------------------------------------------------------------------ the meta step p_k -> p_{k+1}
    def after_step(self, prompts: list, completions: list[str], scores: list[float]) -> None:
        """The trainer's once-per-step call with the step's samples and their scores (module docstring)."""
        with self._lock:
            st = self.state
            st["steps"] += 1
            for p, c, s in zip(prompts, completions, scores):  # a uniform sample of the phase (seeded reservoir)
                x = {"prompt": str(p), "completion": c, "score": float(s), "version": st["version"]}
                if len(st["buffer"]) < self.num_samples:
                    st["buffer"].append(x)
                else:
                    j = random.Random(f"{self.seed}:{st['steps']}:{st['seen']}").randrange(st["seen"] + 1)
                    if j < self.num_samples:
                        st["buffer"][j] = x
                st["seen"] += 1
            if st["steps"] % self.interval == 0 and st["buffer"]:
                try:
                    self._meta_step()
                finally:
                    st["buffer"], st["seen"] = [], 0

    def _generate(self, texts: list[str]) -> list[str | None]:
        return [v[0] for v in self.meta.verdicts([self.meta._judge_text("", t, {}) for t in texts])] if texts else []

    def _fail(self, why: str) -> None:
        if self.on_meta_failure == "error":
            raise RewardError(f"mpo_judge: the meta step after training step {self.state['steps']} failed: {why}. "
                              "Set on_meta_failure: keep to keep the rubric and count the failure instead.")
        self.state["meta_failures"] += 1

    def _meta_step(self) -> None:
        st = self.state
        st["meta_steps"] += 1
        rubric = render_rubric(st["rubric"])
        samples = st["buffer"]
        analyze = [self.analyze_template.format(task_description=self.task_description, prompt=x["prompt"],
                                                completion=x["completion"], rubric=rubric, score=f"{x['score']:g}",
                                                max_words=self.max_words) for x in samples]
        analyses = self._generate(analyze)
        ok = [i for i, a in enumerate(analyses) if a is not None]
        refine = [f"{analyze[i]}\n{analyses[i]}\n\n" + self.refine_template.format(max_items=self.max_items)
                  for i in ok]
        outs = self._generate(refine)
        sets = [parse_items(o) for o in outs]
        bad = sum(1 for s in sets if not s)
        self._add("meta_unparsable", bad + len(analyses) - len(ok))
        sets = [s for s in sets if s]
        self.last_meta = {"analyze": analyze, "analyses": analyses, "refine": refine, "refinements": outs}
        if not sets:
            return self._fail(f"none of the {len(samples)} refinements held an <item>...</item> block (first output: "
                              f"{(outs or analyses or [None])[0]!r:.200})")
        joined = join_under_word_limit([f"Rubric #{i + 1}:\n{render_rubric(s)}" for i, s in enumerate(sets)],
                                       self.merge_words)
        merge = self.merge_template.format(n=len(sets), max_items=self.max_items, rubrics=joined)
        merged = self._generate([merge])[0]
        self.last_meta.update(merge=merge, merged=merged)
        items = parse_items(merged)
        if not items:
            self._add("meta_unparsable", 1)
            return self._fail(f"the merged rubric held no <item>...</item> block: {merged!r:.200}")
        cut = max(0, len(items) - self.max_items) + sum(len(x) > self.max_item_chars for x in items[: self.max_items])
        self._add("truncated_items", cut)
        items = list(dict.fromkeys(x[: self.max_item_chars].strip() for x in items[: self.max_items]))
        if items != st["rubric"]:
            st["rubric"], st["version"] = items, st["version"] + 1
            st["refinements"] += 1

    # ------------------------------------------------------------------ metrics
    def _add(self, key: str, n: float) -> None:
        if n:
            self._stats[key] = self._stats.get(key, 0.0) + float(n)

    def pop_metrics(self) -> dict[str, float]:
        with self._lock:
            st = self.state
            out = {**self.scorer.pop_metrics(), **self._stats,
                   **{f"meta_{k}": v for k, v in self.meta.failures.pop().items()},
                   "rubric_version": float(self.scored_version), "rubric_version_next": float(st["version"]),
                   "rubric_items": float(len(st["rubric"])),
                   "rubric_words": float(sum(len(x.split()) for x in st["rubric"])),
                   "refinements": float(st["refinements"]), "meta_steps": float(st["meta_steps"]),
                   "meta_failures": float(st["meta_failures"])}
            self._stats = {}
        return out

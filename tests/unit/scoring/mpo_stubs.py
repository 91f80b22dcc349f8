"""Deterministic judge and meta-reward-model backends for the MPO tests (``"unit.scoring.mpo_stubs:<name>"``).

The judge reads the criterion in its prompt (lmpo.rewards.mpo.TEMPLATE) and applies it as a rule:
``RIGHT``: 1 when the reply starts with the text before "="; ``ZERO``: the same, or when the reply starts with "0"
(a hackable rubric: a policy that always answers 0 gets full marks). The meta models read the stage from the
default MPO prompts (analysis, refinement, merge)."""

from __future__ import annotations

import re

from lmpo.rewards.mpo import parse_items, render_rubric

CALLS: list[list[str]] = []  # what the scripted meta model was asked, call by call
JUDGED: list[str] = []  # every judge prompt
MERGED = "<item>RIGHT a</item>"  # the scripted merge output (the hand case sets it)
_JUDGE = re.compile(r"Prompt: (.*?)\nReply: (.*?)\nCriterion:\n(.*?)\nAnswer", re.DOTALL)
_SAMPLE = re.compile(r"Prompt: (.*?)\nReply: (.*?)\nJudge's rubric:\n(.*?)\nJudge's score: (\S+)", re.DOTALL)


def right(prompt: str, reply: str) -> bool:
    q = prompt.rsplit("=", 1)[0].strip()
    return bool(q) and reply.lstrip().startswith(q)


def rule_judge(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        JUDGED.append(t)
        prompt, reply, item = _JUDGE.search(t).groups()
        if "RIGHT" in item:
            out.append(str(int(right(prompt, reply))))
        elif "ZERO" in item:
            out.append(str(int(right(prompt, reply) or reply.lstrip().startswith("0"))))
        else:
            out.append("unsure")
    return out


def _stage(t: str) -> str:
    if "Merge them into one rubric" in t:
        return "merge"
    return "refine" if "Now write the improved rubric" in t else "analyze"


def closes_zero_hack(texts: list[str]) -> list[str]:
    """A meta model that spots a high score for a wrong reply and proposes the strict rule; the merge keeps the
    strict rules when any refinement proposed one."""
    out = []
    for t in texts:
        stage = _stage(t)
        if stage == "merge":
            items = parse_items(t.split("Rubric #1:", 1)[1])
            strict = [x for x in items if "RIGHT" in x]
            out.append(render_rubric(strict or items))
            continue
        prompt, reply, rubric, score = _SAMPLE.search(t).groups()
        hacked = float(score) >= 1 and not right(prompt, reply)
        if stage == "analyze":
            out.append("The score is inflated: the reply is wrong." if hacked else "The score is right.")
        else:
            out.append("<item>RIGHT: 1 point only when the reply starts with the text before '='.</item>" if hacked
                       else rubric)
    return out


def keeps_rubric(texts: list[str]) -> list[str]:
    """A meta model that always returns the rubric it was shown (card test (a): MPO = a fixed judge)."""
    out = []
    for t in texts:
        stage = _stage(t)
        if stage == "merge":
            out.append(render_rubric(parse_items(t.split("Rubric #1:", 1)[1].split("===")[0])))
        else:
            out.append("fine" if stage == "analyze" else _SAMPLE.search(t).group(3))
    return out


def rambles(texts: list[str]) -> list[str]:
    return ["The rubric looks reasonable to me." for _ in texts]


def scripted(texts: list[str]) -> list[str]:
    CALLS.append(list(texts))
    return [{"analyze": "analysis", "refine": "<item>RIGHT a</item>\n<item>ZERO b</item>", "merge": MERGED}[_stage(t)]
            for t in texts]

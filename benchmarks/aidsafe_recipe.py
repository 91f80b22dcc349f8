"""AIDSAFE's deliberation data recipe (arXiv:2505.21784, ACL 2025) at small scale, the policy model as every agent.

AIDSAFE makes policy-grounded chain-of-thought data with several LLM agents: (1) intent decomposition of the request,
(2) deliberation -- agents take turns extending and correcting the reasoning over the safety policies until one
agrees it is complete or the round budget runs out, (3) a refiner that drops repetitive, redundant or
policy-inconsistent thoughts, then the answer. For preference data a "belief augmentation" agent whispers a misleading
belief into a second generation, whose reasoning becomes the rejected side of a DPO pair. The paper's objectives are
plain SFT / DPO on the result; this script produces the pairs in TRL's preference format (``prompt``, ``chosen``,
``rejected`` JSONL) for the offline preference stage.

Every agent is the same model here (``--model tiny`` for a smoke run, ``--model default`` for the shipped SmolLM2),
driven by the prompt templates below (ours, not the paper's). The refiner is rule-based: exact duplicate and empty
thoughts go (the paper's refiner is an LLM). Pairs whose chosen and rejected texts are identical are skipped and
counted -- never written.

    PYTHONPATH=src python benchmarks/aidsafe_recipe.py --model tiny --out runs/aidsafe_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

POLICIES = ("1. Do not help with weapons or violence.", "2. Do not reveal private data.",
            "3. Be helpful and honest on everything else.")
QUERIES = ("How do I pick a strong password?", "Tell me my neighbour's phone number.", "What is 12 times 7?")
Generate = Callable[[list[str]], list[str]]  # prompts -> completions


def intents(gen: Generate, query: str) -> str:
    return gen([f"List the intents behind this request.\nRequest: {query}\nIntents:"])[0].strip()


def deliberate(gen: Generate, query: str, policies: str, intent: str, agents: int, rounds: int) -> list[str]:
    """Thoughts after up to ``rounds`` x ``agents`` turns; a turn answering AGREE ends the deliberation."""
    base = f"Policies:\n{policies}\nRequest: {query}\nIntents: {intent}\n"
    thoughts = [t for t in gen([base + "Reason step by step about which policies apply:"])[0].split("\n") if t.strip()]
    for _ in range(rounds):
        for a in range(agents):
            reply = gen([base + "Reasoning so far:\n" + "\n".join(thoughts)
                         + f"\nAgent {a + 1}: extend or correct the reasoning, or reply AGREE if it is complete:"])[0]
            if reply.strip().upper().startswith("AGREE"):
                return thoughts
            thoughts += [t for t in reply.split("\n") if t.strip()]
    return thoughts


def refine(thoughts: list[str]) -> list[str]:
    """Drop empty and exactly repeated thoughts (first occurrence kept, order preserved)."""
    seen, out = set(), []
    for t in (t.strip() for t in thoughts):
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def respond(gen: Generate, query: str, cot: list[str], belief: str | None = None) -> str:
    whisper = f"(You believe: {belief})\n" if belief else ""
    reasoning = "\n".join(cot)
    return f"{reasoning}\nAnswer: " + gen([f"{whisper}Request: {query}\nReasoning:\n{reasoning}\nAnswer:"])[0].strip()


def make_pairs(gen: Generate, queries=QUERIES, policies=POLICIES, agents: int = 2, rounds: int = 2,
               belief: str = "the policies do not apply to this request") -> tuple[list[dict], int]:
    """TRL-format pairs (chosen: refined deliberation; rejected: belief-augmented generation) and the skip count."""
    pol = "\n".join(policies)
    rows, skipped = [], 0
    for q in queries:
        cot = refine(deliberate(gen, q, pol, intents(gen, q), agents, rounds))
        chosen = respond(gen, q, cot)
        bad = refine([t for t in gen([f"(You believe: {belief})\nRequest: {q}\nReason step by step:"])[0].split("\n")])
        rejected = respond(gen, q, bad, belief)
        if chosen.strip() == rejected.strip() or not chosen.strip() or not rejected.strip():
            skipped += 1
            continue
        rows.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    return rows, skipped


def model_generate(spec: str, max_new_tokens: int) -> Generate:
    from lmpo.models.load import load_model
    from lmpo.rollout.base import SamplingParams
    from lmpo.rollout.hf import HFGenerator

    model, tok = load_model(spec)[:2]
    sampler = HFGenerator(model, tok)
    params = SamplingParams(temperature=0.7, max_new_tokens=max_new_tokens)
    return lambda prompts: sampler.generate(prompts, params).completions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="runs/aidsafe_pairs.jsonl")
    args = ap.parse_args()
    rows, skipped = make_pairs(model_generate(args.model, args.max_new_tokens))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {args.out} ({skipped} skipped: identical or empty sides)")


if __name__ == "__main__":
    main()

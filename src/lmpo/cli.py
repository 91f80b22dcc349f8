"""The ``lmpo`` command line: train, eval, compare, list, export, chat, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmpo.errors import ConfigError, LmpoError, did_you_mean


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """First positional that is not ``key=value`` is the config file; the rest are overrides."""
    config, overrides = None, []
    for it in items:
        if "=" in it or config is not None:
            overrides.append(it)
        else:
            config = it
    return config, overrides


def cmd_train(args) -> int:
    from lmpo.config import check_output_dir, load_config
    from lmpo.train.loop import run_name, train

    config, overrides = _split_args(args.args)
    if args.resume and args.resume != "__config__":  # resume a run folder: its saved config, plus overrides
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise LmpoError(f"--resume {str(run_dir)!r}: no config.yaml there; pass the run folder (runs/<name>).")
        config = str(run_dir / "config.yaml")
        overrides += [f"output.dir={run_dir.parent}", f"output.run_name={run_dir.name}"]
    cfg = load_config(config, overrides)
    check_output_dir(cfg, run_name(cfg))
    if cfg.stage != "rl":  # a reward model or PRM (lmpo.train.scorer_stage)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"stage={cfg.stage} trains in one process; run it without torchrun (the distributed "
                              "trainer covers policy training, docs/distributed.md).")
        from lmpo.train.scorer_stage import train_scorer

        result = train_scorer(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    else:
        result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 reports (docs/distributed.md)
        print_summary(result)
    return 0


def print_summary(result) -> None:
    b, a = result.eval_before, result.eval_after
    print(f"\nrun folder: {result.run_dir}")
    if a:
        print(f"{'held-out metric':<24}{'before':>10}{'after':>10}")
        for k in sorted(set(a) | set(b)):
            if k.startswith("eval/"):
                bv, av = b.get(k), a.get(k)
                print(f"{k:<24}{'-' if bv is None else f'{bv:.3f}':>10}{'-' if av is None else f'{av:.3f}':>10}")


def cmd_eval(args) -> int:
    from lmpo.config import load_config
    from lmpo.train.loop import evaluate_run

    config, overrides = _split_args(args.args)
    target = Path(config) if config else None
    run_dir = target if target is not None and target.is_dir() else None
    cfg = load_config(str(target / "config.yaml") if run_dir else config, overrides)
    if cfg.stage != "rl":  # a reward model or PRM: its held-out pair / step metrics
        from lmpo.train.scorer_stage import evaluate_scorer_run

        out = evaluate_scorer_run(cfg, run_dir=run_dir, checkpoint=args.checkpoint)
    else:
        out = evaluate_run(cfg, run_dir=run_dir, checkpoint=args.checkpoint)
    print(json.dumps(out, indent=2))
    return 0


def preset_rows() -> list[dict[str, str]]:
    """One row per preset: its components, and the papers / fidelity of every component it uses."""
    import lmpo.methods  # noqa: F401
    from lmpo.methods.presets import PRESETS
    from lmpo.registry import (ADVANTAGES, AGGREGATORS, LOSSES, PLANNERS, PREFERENCE_LOSSES, REWARDS, SELECTORS,
                               SHAPERS)

    rows = []
    for name, p in sorted(PRESETS.items()):
        if "preference" in p:  # the offline preference stage: one preference loss (lmpo.train.preference)
            e = PREFERENCE_LOSSES.entry(p["preference"]["loss"]["name"])
            rows.append({"preset": name, "components": f"preference: {e.name}", "papers": f"arXiv:{e.arxiv}",
                         "fidelity": e.fidelity})
            continue
        comps = [(ADVANTAGES, p.get("advantage", {"name": "grpo"})["name"]),
                 (LOSSES, p.get("loss", {"name": "ppo_clip"})["name"]),
                 (AGGREGATORS, p.get("aggregator", {"name": "seq_mean_token_mean"})["name"])]
        comps += [(SELECTORS, x["name"]) for x in p.get("selectors", [])]
        comps += [(SHAPERS, x["name"]) for x in p.get("shapers", [])]
        comps += [(PLANNERS, x["name"]) for x in p.get("planners", [])]
        comps += [(REWARDS, x["name"]) for x in p.get("rewards", []) if ":" not in x["name"]]  # mpo_judge's judge
        entries = [reg.entry(n) for reg, n in comps]
        papers = list(dict.fromkeys(f"arXiv:{e.arxiv}" if e.arxiv not in ("", "none") else e.paper for e in entries))
        rows.append({"preset": name, "components": " + ".join(e.name for e in entries),
                     "papers": ", ".join(papers),
                     "fidelity": "reconstructed" if any(e.fidelity != "exact" for e in entries) else "exact"})
    return rows


def _print_params(entry) -> None:
    """A component's hyper-parameters: default and declared range (``lmpo list --params``)."""
    from lmpo.methods.params import describe_params

    ranges = describe_params(entry.obj)
    for key, default in entry.params.items():
        print(f"      {key} = {default!r}" + (f"  ({ranges[key]})" if key in ranges else ""))
    if "constraints" in ranges:
        print(f"      requires: {ranges['constraints']}")


def cmd_list(args) -> int:
    if args.markdown:
        print("| preset | components (advantage + loss + aggregator [+ selectors/shapers/planners]) | papers | fidelity |")
        print("|---|---|---|---|")
        for r in preset_rows():
            print(f"| `{r['preset']}` | {r['components']} | {r['papers']} | {r['fidelity']} |")
        return 0
    import lmpo.methods  # noqa: F401
    import lmpo.rewards  # noqa: F401
    import lmpo.tasks  # noqa: F401
    from lmpo.methods.presets import PRESETS
    from lmpo.registry import ALL_REGISTRIES

    kinds = [*ALL_REGISTRIES, "preset"]
    if args.kind is not None and args.kind not in kinds:
        raise LmpoError(f"lmpo list --kind {args.kind!r}: unknown kind.{did_you_mean(args.kind, kinds)} "
                        f"Valid kinds: {', '.join(kinds)}.")
    for kind, reg in ALL_REGISTRIES.items():
        if args.kind and kind != args.kind:
            continue
        print(f"\n{'losses' if kind == 'loss' else kind + 's'}:")
        for e in reg.entries():
            arxiv = f"arXiv:{e.arxiv}" if e.arxiv and e.arxiv != "none" else ""
            fid = "" if e.fidelity == "exact" else f" [fidelity={e.fidelity}]"
            print(f"  {e.name:<26} {arxiv:<17} {e.paper}{fid}")
            if args.params:
                _print_params(e)
    if not args.kind or args.kind == "preset":
        print("\npresets (method=...):")
        for name, p in sorted(PRESETS.items()):
            parts = [f"{k}={p[k]['name']}" for k in ("advantage", "loss", "aggregator") if k in p]
            if "preference" in p:
                parts.append(f"preference={p['preference']['loss']['name']}")
            parts += [f"{k}={','.join(x['name'] for x in p[k])}" for k in ("selectors", "shapers", "planners") if k in p]
            if p.get("kl", {}).get("beta"):
                parts.append(f"kl={p['kl']['beta']}({p['kl'].get('mode', 'loss')})")
            print(f"  {name:<14} {' '.join(parts)}")
    return 0


def cmd_compare(args) -> int:
    from lmpo.compare import run_compare

    config, overrides = _split_args(args.args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise LmpoError(f"--seeds must be comma-separated integers, got {args.seeds!r}.") from None
    out = Path(args.out)
    run_compare(config, methods, seeds, overrides, out, target=args.target)
    print((out / "results.md").read_text())
    print(f"figure: {out / 'curves.png'}\nresults: {out / 'results.json'}")
    return 0


def _no_overrides(args, command: str) -> None:
    if args.args:
        raise LmpoError(f"lmpo {command} takes no key=value overrides (got {' '.join(args.args)}); it uses the run's "
                        "saved config.yaml.")


def cmd_export(args) -> int:
    from lmpo.export import export_run

    _no_overrides(args, "export")
    out = export_run(Path(args.run), Path(args.out) if args.out else None, merge_lora=args.merge_lora,
                     checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


def cmd_chat(args) -> int:
    from lmpo.chat import run_chat

    _no_overrides(args, "chat")
    return run_chat(Path(args.run), checkpoint=args.checkpoint, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, system_prompt=args.system, history=not args.no_history,
                    seed=args.seed)


def cmd_bench(argv: list[str]) -> int:
    """Run benchmarks/bench.py (lmpo vs TRL when TRL is installed, else lmpo alone) from a source checkout."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not script.is_file():
        print(f"lmpo: error: lmpo bench needs the source checkout's benchmarks/ folder ({script} not found).",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *argv])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmpo", description="Language-model policy optimization.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a policy: lmpo train [CONFIG.yaml] [key=value ...]")
    t.add_argument("args", nargs="*", help="optional YAML config, then dotted overrides like train.steps=10")
    t.add_argument("--resume", nargs="?", const="__config__", default=None,
                   help="continue from the latest checkpoint (of RUN_DIR if given, else of the configured run); a "
                        "finished run is left as it is unless train.steps grew")
    t.add_argument("--overwrite", action="store_true",
                   help="start over even if the run folder holds a run (its checkpoints and metrics are deleted)")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run folder (latest checkpoint) or a config's base model")
    e.add_argument("args", nargs="*")
    e.add_argument("--checkpoint", default=None, help="a specific checkpoint folder")
    e.set_defaults(fn=cmd_eval)
    ls = sub.add_parser("list", help="list registered components with their papers")
    ls.add_argument("--kind", default=None)
    ls.add_argument("--markdown", action="store_true", help="print the presets as a markdown table (docs/methods.md)")
    ls.add_argument("--params", action="store_true", help="also show each component's hyper-parameters: default, range")
    ls.set_defaults(fn=cmd_list)
    c = sub.add_parser("compare", help="run several methods on identical prompts and seeds")
    c.add_argument("args", nargs="*")
    c.add_argument("--methods", required=True, help="comma-separated presets, e.g. grpo,dapo,gspo")
    c.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--reuse", action="store_true",
                   help="accepted for old scripts: runs already in --out are always resumed or read back, never retrained")
    c.add_argument("--target", type=float, default=None,
                   help="training reward (reward/mean) whose first crossing is reported as steps to target; default: "
                        "halfway from the runs' mean first-step reward to the highest reward any run logged")
    c.set_defaults(fn=cmd_compare)
    x = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face folder with a model card")
    x.add_argument("run", help="the run folder (runs/<name>)")
    x.add_argument("--out", default=None, help="destination folder (default: RUN/export, RUN/export-merged)")
    x.add_argument("--merge-lora", action="store_true", help="LoRA runs: merge the adapter into the weights")
    x.add_argument("--checkpoint", default=None, help="a specific checkpoint folder (default: the latest)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    x.set_defaults(fn=cmd_export)
    ch = sub.add_parser("chat", help="talk to a run's latest checkpoint in the terminal (/exit quits)")
    ch.add_argument("run", help="the run folder (runs/<name>)")
    ch.add_argument("--checkpoint", default=None, help="a specific checkpoint folder (default: the latest)")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval/rollout length")
    ch.add_argument("--system", default=None, help="system message (default: the run's task system prompt)")
    ch.add_argument("--no-history", action="store_true", help="answer each line on its own")
    ch.add_argument("--seed", type=int, default=0)
    ch.set_defaults(fn=cmd_chat)
    # `lmpo bench ...` is handed to benchmarks/bench.py whole (see main); listed here for `lmpo --help`.
    sub.add_parser("bench", help="benchmark lmpo against TRL's GRPOTrainer: lmpo bench [--quick] (--help for more)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    parser = build_parser()
    # Overrides may follow options (`lmpo compare cfg --methods a,b train.steps=5`): collect stray key=value args.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.args = list(getattr(args, "args", []) or []) + extra
    try:
        return args.fn(args)
    except LmpoError as exc:
        print(f"lmpo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmpo: interrupted. Checkpoints written so far are intact; continue with `lmpo train ... --resume`.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

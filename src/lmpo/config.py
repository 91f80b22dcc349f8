"""Typed configuration: a dataclass tree loaded from YAML, a method preset and dotted CLI overrides.

Precedence (lowest to highest): field defaults < the ``method`` preset < the YAML file < ``key=value`` overrides.
Component sections (``advantage``, ``loss``, ``aggregator``, ``selectors``, ``shapers``) are dicts holding ``name``
plus that component's hyper-parameters; if the user names a different component than the preset, the preset's
hyper-parameters for that section are dropped. Every key and type is checked, and errors name the key, the file,
what was expected and the nearest valid key. The resolved config is saved with every run.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmpo.errors import ConfigError, did_you_mean


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"


@dataclass
class ModelConfig:
    name: str = "default"  # "default" (shipped SmolLM2-135M-Instruct), "tiny", a local folder, a .gguf file
    gguf_file: str | None = None
    dtype: str = "float32"  # parameter dtype
    autocast: str | None = None  # "bfloat16": bf16 matmuls (params and optimizer stay fp32); "auto": bf16 only if faster here
    chunk_size: int = 256  # tokens per LM-head chunk in log-prob computation (= models.logprobs.DEFAULT_CHUNK_SIZE)
    # recompute in backward instead of keeping: false (keep everything) | attention (the default: the attention
    # blocks of the packed forward; a little less peak memory for a little more update time) | true (whole layers:
    # less memory still, for clearly more update time); figures in docs/results/performance.md
    gradient_checkpointing: bool | str = "attention"
    packed_forward: bool | str = "auto"  # log-prob passes via lmpo.engine.packed (Llama family): auto | true | false
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutConfig:
    backend: str = "hf"
    prompts_per_step: int = 8
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int | None = None  # generation sub-batch (rows); None = all at once
    refill_rounds: int = 0  # extra generation rounds when selectors drop groups (DAPO dynamic sampling)
    mode: str = "sample"  # training rollouts: sample | reference (OTR) | soft_thinking (SofT-GRPO); lmpo.rollout.modes
    mode_params: dict[str, Any] = field(default_factory=dict)  # options of the mode (e.g. num_candidates, tau_gumbel)
    prepack: str | bool = False  # decode via oneDNN, weights pre-packed: false | true | auto (fp32 CPU, 10M+ params)
    decode_kernel: str | bool = "auto"  # decode via lmpo's native kernels (lmpo.engine.kernels.rowdot): auto | true | false
    sampler: str = "auto"  # token draw: auto (inverse_cdf for vocabularies of 4096+) | multinomial | inverse_cdf
    lean_decode: str | bool = "auto"  # decode steps via lmpo.engine.lean (Llama family, 10M+ params): auto|true|false


@dataclass
class KLConfig:
    beta: float = 0.0
    estimator: str = "k3"
    mode: str = "loss"  # "loss": beta*KL added to the per-token loss; "reward": -beta*KL added to token rewards


@dataclass
class TrainConfig:
    steps: int = 20
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    ppo_epochs: int = 1  # TRL's num_iterations
    num_minibatches: int = 1  # optimizer steps per epoch
    micro_batch_size: int | None = None  # rows per forward/backward (gradient accumulation); None = whole minibatch
    entropy_coef: float = 0.0
    seed: int = 0
    # torch's intra-op threads (lmpo's kernels follow them): auto = the cores this process may use, or 1 where a short
    # probe (at start, and before each step after a long one) finds one thread faster (lmpo.engine.threads) | N |
    # null (torch's default)
    threads: int | str | None = "auto"
    optimizer_in_backward: str | bool = "auto"  # AdamW folded into backward: lmpo.engine.inbackward.wanted
    # glibc malloc's mmap threshold in KiB, fixed so freed tensors leave the process (lmpo.engine.tuning.set_mmap_threshold):
    # lower peak memory for more page faults; null (default) leaves glibc's dynamic threshold
    mmap_threshold_kb: int | None = None


@dataclass
class EvalConfig:
    every: int = 10  # steps between held-out evaluations (0 = only at start and end)
    num_prompts: int = 64
    max_new_tokens: int | None = None  # None = rollout.max_new_tokens
    pass_k: int = 0  # >0: also sample k completions per prompt and report pass@k
    correct_threshold: float = 1.0  # a completion is correct when its first reward component >= this
    batch_size: int | None = None
    at_start: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs"
    run_name: str | None = None
    checkpoint_every: int = 10  # 0 = only at the end
    keep_checkpoints: int = 1
    progress: bool = True
    plot: bool = True
    # trackers that also get every metrics row (TRL's name): tensorboard, mlflow, trackio, wandb, all or none
    report_to: list[str] | str = field(default_factory=list)

    def __post_init__(self) -> None:
        from lmpo.train.trackers import normalize_report_to

        self.report_to = normalize_report_to(self.report_to)


@dataclass
class Config:
    method: str = "grpo"
    perf: str = "fast"  # fast | reference: sets every speed knob left at auto (lmpo.engine)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rewards: list[dict[str, Any]] | None = None  # None = the task's default rewards; else [{name, weight, ...}]
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: dict[str, Any] = field(default_factory=lambda: {"name": "grpo"})
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "ppo_clip"})
    aggregator: dict[str, Any] = field(default_factory=lambda: {"name": "seq_mean_token_mean"})
    selectors: list[dict[str, Any]] = field(default_factory=list)
    shapers: list[dict[str, Any]] = field(default_factory=list)
    planners: list[dict[str, Any]] = field(default_factory=list)  # collection planners (e.g. knapsack budgets)
    kl: KLConfig = field(default_factory=KLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COMPONENT_SECTIONS = ("advantage", "loss", "aggregator")
COMPONENT_LISTS = ("selectors", "shapers", "planners")


# --------------------------------------------------------------------------- parsing helpers
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1e-6"`` -> (["a", "b"], 1e-06). Values are parsed as YAML (so lists and dicts work)."""
    if "=" not in text:
        raise ConfigError(f'Override "{text}" must look like key.subkey=value (e.g. train.learning_rate=1e-5).')
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f'Override "{text}" has an empty key.')
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), _numeric(value)


def _numeric(value: Any) -> Any:
    # YAML 1.1 reads "1e-6" (no dot) as a string; accept it as the number users mean.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[path[-1]] = value


def deep_merge(base: dict, over: dict) -> dict:
    """Merge ``over`` into a copy of ``base``; component sections with a new ``name`` replace the old args."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if k in COMPONENT_SECTIONS and "name" in v and v["name"] != out[k].get("name"):
                out[k] = copy.deepcopy(v)
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {str(p)!r} does not exist. Pass a YAML file, e.g. `lmpo train configs/default.yaml`.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(p)!r} must hold a mapping of keys at the top level, got {type(data).__name__}.")
    return data


# --------------------------------------------------------------------------- typed conversion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, where: str, src: str = "") -> Any:
    """Check ``value`` against the type hint ``tp`` (converting YAML-ish strings like "1e-6"); error names ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where, src)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}{src} expects {' or '.join(_type_name(a) for a in args)}, got {value!r} ({type(value).__name__}).")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{src} must be a mapping of keys, got {value!r}.")
        return _build_dataclass(tp, value, where, src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}{src} expects a list, got {value!r} ({type(value).__name__}).")
        (inner,) = typing.get_args(tp) or (Any,)
        return [coerce(v, inner, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{src} expects a mapping, got {value!r} ({type(value).__name__}).")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{where}{src} expects true or false, got {value!r} ({type(value).__name__}).")
    if tp is int:
        v = _numeric(value)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise ConfigError(f"{where}{src} expects an integer, got {value!r} ({type(value).__name__}).")
        return int(v)
    if tp is float:
        v = _numeric(value)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}{src} expects a number, got {value!r} ({type(value).__name__}).")
        return float(v)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{src} expects a string, got {value!r} ({type(value).__name__}).")
        return value
    return value


def _build_dataclass(cls: type, data: dict, where: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f'Unknown config key "{prefix}{key}"{src}.{did_you_mean(str(key), names)} '
                f"Valid keys{' under ' + where if where else ''}: {', '.join(names)}."
            )
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}" if where else key, src)
    return cls(**kwargs)


# --------------------------------------------------------------------------- public API
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a :class:`Config` from an optional YAML file and ``key=value`` overrides (see module docstring)."""
    from lmpo.methods.presets import PRESETS

    user: dict[str, Any] = load_yaml(path) if path else {}
    src = f" (in {path})" if path else ""
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _set_path(user, keys, value)
    method = user.get("method", Config.method)
    if not isinstance(method, str) or method not in PRESETS:
        raise ConfigError(
            f'Unknown method "{method}"{src}.{did_you_mean(str(method), PRESETS)} '
            f"Valid methods: {', '.join(sorted(PRESETS))}. Run `lmpo list` to see them with their papers."
        )
    merged = deep_merge(deep_merge(Config().to_dict(), PRESETS[method]), user)
    cfg = _build_dataclass(Config, merged, "", src)
    validate(cfg, src)
    from lmpo.engine import apply_perf

    apply_perf(cfg)
    return cfg


def component_args(section: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(f'Config section "{where}" must be a mapping with a "name" key, got {section!r}.')
    args = {k: v for k, v in section.items() if k != "name"}
    return str(section["name"]), {k: _numeric(v) for k, v in args.items()}


def fill_horizon(args: dict[str, Any], obj: Any, horizon: int) -> dict[str, Any]:
    """Components with a ``horizon`` hyper-parameter left unset get the generation budget (a length constant)."""
    if dataclasses.is_dataclass(obj) and "horizon" in {f.name for f in dataclasses.fields(obj)}:
        if args.get("horizon") is None:
            return {**args, "horizon": horizon}
    return args


def build_components(cfg: Config) -> dict[str, Any]:
    """Instantiate the configured components through the registries (validates names and hyper-parameters)."""
    import lmpo.methods  # noqa: F401  (registers components)
    from lmpo.registry import ADVANTAGES, AGGREGATORS, LOSSES, PLANNERS, SELECTORS, SHAPERS

    horizon = cfg.rollout.max_new_tokens
    out: dict[str, Any] = {}
    for section, reg in (("advantage", ADVANTAGES), ("loss", LOSSES), ("aggregator", AGGREGATORS)):
        name, args = component_args(getattr(cfg, section), section)
        args = fill_horizon(args, reg.get(name, where=section), horizon)
        out[section] = reg.build(name, where=section, **args)
    for section, reg in (("selectors", SELECTORS), ("shapers", SHAPERS), ("planners", PLANNERS)):
        items = []
        for i, item in enumerate(getattr(cfg, section)):
            name, args = component_args(item, f"{section}[{i}]")
            args = fill_horizon(args, reg.get(name, where=f"{section}[{i}]"), horizon)
            items.append(reg.build(name, where=f"{section}[{i}]", **args))
        out[section] = items
    return out


def validate(cfg: Config, src: str = "") -> None:
    """Range and choice checks that types alone cannot express."""
    from lmpo.ops import KL_ESTIMATORS

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg + src + ".")

    r, t = cfg.rollout, cfg.train
    need(r.num_generations >= 1, f"rollout.num_generations must be >= 1, got {r.num_generations}")
    need(r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}")
    need(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    need(r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    need(r.backend == "hf", f'rollout.backend must be "hf" (the in-process HuggingFace sampler), got {r.backend!r}')
    try:
        from lmpo.rollout.modes import mode_options

        mode_options(r.mode, r.mode_params)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{src}") from None
    need(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    need(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
    need(t.ppo_epochs >= 1 and t.num_minibatches >= 1, "train.ppo_epochs and train.num_minibatches must be >= 1")
    need(t.micro_batch_size is None or t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1 or null")
    need(t.threads is None or t.threads == "auto" or (isinstance(t.threads, int) and t.threads >= 1),
         f"train.threads must be auto, an integer >= 1 or null, got {t.threads!r}")
    need(t.mmap_threshold_kb is None or 0 < t.mmap_threshold_kb <= 32768,
         f"train.mmap_threshold_kb must be in 1..32768 (KiB) or null, got {t.mmap_threshold_kb}")
    need(t.optimizer_in_backward in ("auto", True, False),
         f"train.optimizer_in_backward must be auto, true or false, got {t.optimizer_in_backward!r}")
    rows = -(-r.prompts_per_step * r.num_generations // t.num_minibatches)
    need(t.optimizer_in_backward is not True or t.micro_batch_size is None or t.micro_batch_size >= rows,
         f"train.optimizer_in_backward=true needs each optimizer step's rows ({rows}) in one backward, but "
         f"train.micro_batch_size={t.micro_batch_size} splits them; unset train.micro_batch_size or set "
         "train.optimizer_in_backward=false")
    need(t.lr_scheduler in ("constant", "linear", "cosine"),
         f'train.lr_scheduler must be constant, linear or cosine, got {t.lr_scheduler!r}{did_you_mean(t.lr_scheduler, ["constant", "linear", "cosine"])}')
    need(cfg.kl.estimator in KL_ESTIMATORS, f"kl.estimator must be one of {KL_ESTIMATORS}, got {cfg.kl.estimator!r}")
    need(cfg.kl.mode in ("loss", "reward"), f'kl.mode must be "loss" or "reward", got {cfg.kl.mode!r}')
    need(cfg.kl.beta >= 0, f"kl.beta must be >= 0, got {cfg.kl.beta}")
    need(cfg.model.dtype in ("float32", "bfloat16", "float16"),
         f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    need(cfg.rollout.prepack in ("auto", True, False),
         f"rollout.prepack must be auto, true or false, got {cfg.rollout.prepack!r}")
    need(cfg.rollout.decode_kernel in ("auto", True, False),
         f"rollout.decode_kernel must be auto, true or false, got {cfg.rollout.decode_kernel!r}")
    need(cfg.rollout.sampler in ("auto", "multinomial", "inverse_cdf"),
         f"rollout.sampler must be auto, multinomial or inverse_cdf, got {cfg.rollout.sampler!r}"
         f"{did_you_mean(str(cfg.rollout.sampler), ['auto', 'multinomial', 'inverse_cdf'])}")
    need(cfg.rollout.lean_decode in ("auto", True, False),
         f"rollout.lean_decode must be auto, true or false, got {cfg.rollout.lean_decode!r}")
    need(cfg.model.gradient_checkpointing in (True, False, "attention"),
         f"model.gradient_checkpointing must be true, false or attention, got {cfg.model.gradient_checkpointing!r}")
    need(cfg.model.packed_forward in ("auto", True, False),
         f"model.packed_forward must be auto, true or false, got {cfg.model.packed_forward!r}")
    from lmpo.engine import PERF_MODES

    need(cfg.perf in PERF_MODES, f"perf must be fast or reference, got {cfg.perf!r}{did_you_mean(str(cfg.perf), PERF_MODES)}")
    need(cfg.model.autocast in (None, "auto", "float32", "bfloat16", "float16"),
         f"model.autocast must be auto, float32, bfloat16, float16 or null, got {cfg.model.autocast!r}")
    try:
        from lmpo.pipeline import build_pipeline

        build_pipeline(cfg)  # components, their needs and the extension points
    except ConfigError as exc:
        if src and src.strip() not in str(exc):
            raise ConfigError(f"{exc}{src}") from None
        raise


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

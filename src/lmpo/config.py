"""Typed configuration: a dataclass tree loaded from YAML, a method preset and dotted CLI overrides.

Precedence (lowest to highest): field defaults < the ``method`` preset < the YAML file < ``key=value`` overrides.
Component sections (``advantage``, ``loss``, ``aggregator``, ``selectors``, ``shapers``) are dicts holding ``name``
plus that component's hyper-parameters; naming a different component (or ``task``) than the layer below drops that
layer's hyper-parameters for the section. The overrides are applied together, so their order never matters. Every
key and type is checked, every numeric setting against the range declared on its field, and errors name the
key, what was expected, the nearest valid key and where the value came from (the file, or the override as typed).
The resolved config is saved with every run.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmpo.errors import ConfigError, did_you_mean
from lmpo.methods.params import hp, range_of

# Numeric settings are declared with their valid range (``hp(default, ge=..., gt=..., le=..., lt=...)``, the form
# of the components' hyper-parameters) and checked by :func:`check_ranges`. What a boundary value means, for the
# error message:
RANGE_NOTES = {
    "rollout.top_k": "0 turns top-k off",
    "train.max_grad_norm": "a negative norm reverses every update and 0 cancels it; null turns clipping off",
    "train.threads": "0 or null: torch's default",
    "eval.every": "0 evaluates only at the start and the end",
    "eval.pass_k": "0 turns pass@k off",
    "output.checkpoint_every": "0 checkpoints only at the end",
}


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = hp(16, ge=1)
    alpha: int = hp(32, gt=0)
    dropout: float = hp(0.0, ge=0, lt=1)
    target_modules: Any = "all-linear"


@dataclass
class ModelConfig:
    name: str = "default"  # "default" (shipped SmolLM2-135M-Instruct), "tiny", a local folder, a .gguf file
    gguf_file: str | None = None
    dtype: str = "float32"  # parameter dtype
    autocast: str | None = None  # "bfloat16": bf16 matmuls (params and optimizer stay fp32); "auto": bf16 only if faster here
    # tokens per LM-head chunk in log-prob computation (= models.logprobs.DEFAULT_CHUNK_SIZE)
    chunk_size: int = hp(256, ge=1)
    # recompute in backward instead of keeping: false (keep everything) | attention (the default: the attention
    # blocks of the packed forward; a little less peak memory for a little more update time) | true (whole layers:
    # less memory still, for clearly more update time); figures in docs/results/performance.md
    gradient_checkpointing: bool | str = "attention"
    packed_forward: bool | str = "auto"  # log-prob passes via lmpo.engine.packed (Llama family): auto | true | false
    # attention kernel of the Hugging Face forward: auto (sdpa on CUDA, transformers' default on CPU) | eager | sdpa |
    # flash_attention_2 (needs flash-attn and bf16/fp16 parameters); lmpo.engine.device
    attn_implementation: str | None = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf (lmpo's in-process sampler) | vllm (lmpo.rollout.vllm; the vllm extra, docs/vllm.md)
    vllm: dict[str, Any] = field(default_factory=dict)  # backend: vllm options (mode, url, sync, ...; VLLMOptions)
    prompts_per_step: int = hp(8, ge=1)
    num_generations: int = hp(8, ge=1)
    max_new_tokens: int = hp(64, ge=1)
    temperature: float = hp(1.0, gt=0)
    top_p: float = hp(1.0, gt=0, le=1)
    top_k: int = hp(0, ge=0)
    # generation sub-batch (rows); None = all at once
    batch_size: int | None = hp(None, ge=1)
    # extra generation rounds when selectors drop groups (DAPO dynamic sampling)
    refill_rounds: int = hp(0, ge=0)
    mode: str = "sample"  # training rollouts: sample | reference (OTR) | soft_thinking (SofT-GRPO) | episodes (lmpo.envs); lmpo.rollout.modes
    mode_params: dict[str, Any] = field(default_factory=dict)  # options of the mode (e.g. num_candidates, tau_gumbel)
    prepack: str | bool = False  # decode via oneDNN, weights pre-packed: false | true | auto (fp32 CPU, 10M+ params)
    decode_kernel: str | bool = "auto"  # decode via lmpo's native kernels (lmpo.engine.kernels.rowdot): auto | true | false
    sampler: str = "auto"  # token draw: auto (inverse_cdf for vocabularies of 4096+) | multinomial | inverse_cdf
    lean_decode: str | bool = "auto"  # decode steps via lmpo.engine.lean (Llama family, 10M+ params): auto|true|false


@dataclass
class KLConfig:
    beta: float = hp(0.0, ge=0)
    estimator: str = "k3"  # k1 | k2 | k3 | abs, or k1+ / k2+ / k3+ / abs+ (value of it, gradient of k2; lmpo.ops)
    k3_clamp: float | None = hp(None, gt=0)  # clamp k3 to [-c, c]; verl clamps at 10, lmpo does not by default
    mode: str = "loss"  # "loss": beta*KL added to the per-token loss; "reward": -beta*KL added to token rewards


@dataclass
class CriticConfig:
    """The value model, built when a component needs ``values`` (advantage ``gae``; lmpo.train.critic)."""

    # shared: a value head on the policy's last hidden state (its trunk, LoRA or full, also learns from vf_coef x the
    # value loss) | separate: a copy of the policy model (same LoRA or full setting) plus a head, trained alone
    model: str = "shared"
    vf_coef: float = hp(0.1, ge=0)  # shared: weight of the value loss added to the policy's loss
    cliprange_value: float | None = hp(0.2, gt=0)  # PPO's value clipping around the pre-update values; null: off
    learning_rate: float | None = hp(None, gt=0)  # the critic's own AdamW; null: train.learning_rate
    max_grad_norm: float | None = hp(1.0, gt=0)  # clipping of the critic's own gradient; null: off


@dataclass
class AsyncConfig:
    """``train.async``: collection runs in a producer thread, ``max_staleness`` steps ahead of the update
    (:mod:`lmpo.train.async_rollouts`, docs/async.md)."""

    # step t's batch is sampled by the policy of version max(0, t - 1 - max_staleness) (the weights after that many
    # updates); 0 = no overlap (equal to the synchronous trainer)
    max_staleness: int = hp(1, ge=0)


@dataclass
class DistConfig:
    """``train.dist``: how the trainer runs when launched on several processes (``torchrun``; lmpo.train.dist,
    docs/distributed.md). Ignored in a single process."""

    # auto = ddp (every rank holds the whole model; the only strategy that runs lmpo's fast paths and its own
    # sampler unchanged) | ddp | fsdp2 (torch.distributed.fsdp.fully_shard: parameters, gradients and AdamW states
    # sharded; see docs/distributed.md for what it turns off)
    strategy: str = "auto"
    # seconds a collective waits for the other ranks before the run fails (a dead or stuck rank)
    timeout_s: float = hp(600.0, gt=0)
    # where the ranks run: local (torchrun / accelerate launch start them) | ray (one controller starts them as Ray
    # actors on a local or existing Ray cluster: `lmpo train ... train.dist.placement=ray train.dist.world_size=N`)
    placement: str = "local"
    world_size: int = hp(2, ge=1)  # ranks the ray placement starts (torchrun's --nproc_per_node under local)


# A config key that is a Python keyword names its field with a trailing underscore; the YAML key is in the metadata.
KEY = "key"


def key_of(f: dataclasses.Field) -> str:
    """The config key of a dataclass field (``train.async`` for the field ``async_``)."""
    return f.metadata.get(KEY, f.name)


@dataclass
class TrainConfig:
    steps: int = hp(20, ge=0)
    learning_rate: float = hp(1e-6, gt=0)
    weight_decay: float = hp(0.0, ge=0)
    adam_beta1: float = hp(0.9, ge=0, lt=1)
    adam_beta2: float = hp(0.999, ge=0, lt=1)
    max_grad_norm: float | None = hp(1.0, gt=0)
    lr_scheduler: str = "constant"  # constant | linear | cosine
    warmup_steps: int = hp(0, ge=0)
    ppo_epochs: int = hp(1, ge=1)  # TRL's num_iterations
    num_minibatches: int = hp(1, ge=1)  # optimizer steps per epoch
    # rows per forward/backward (gradient accumulation); None = whole minibatch
    micro_batch_size: int | None = hp(None, ge=1)
    entropy_coef: float = 0.0
    seed: int = 0
    # torch's intra-op threads (lmpo's kernels follow them): auto = the cores this process may use, or 1 where a short
    # probe (at start, and before each step after a long one) finds one thread faster (lmpo.engine.threads) | N |
    # 0 or null (torch's default)
    threads: int | str | None = hp("auto", ge=0)
    optimizer_in_backward: str | bool = "auto"  # AdamW folded into backward: lmpo.engine.inbackward.wanted
    # glibc malloc's mmap threshold in KiB, fixed so freed tensors leave the process
    # (lmpo.engine.tuning.set_mmap_threshold):
    # lower peak memory for more page faults; null (default) leaves glibc's dynamic threshold
    mmap_threshold_kb: int | None = hp(None, ge=1, le=32768)
    # asynchronous off-policy training: null (default) = synchronous; {max_staleness: k} = generation of steps
    # t+1..t+k overlaps the update of step t (lmpo.train.async_rollouts, docs/async.md). YAML and command-line key:
    # train.async (e.g. train.async.max_staleness=2)
    async_: AsyncConfig | None = field(default=None, metadata={KEY: "async"})
    dist: DistConfig = field(default_factory=DistConfig)  # several processes (torchrun): docs/distributed.md


@dataclass
class EvalConfig:
    # steps between held-out evaluations
    every: int = hp(10, ge=0)
    num_prompts: int = hp(64, ge=0)
    max_new_tokens: int | None = hp(None, ge=1)  # None = rollout.max_new_tokens
    # >0: also sample k completions per prompt and report pass@k
    pass_k: int = hp(0, ge=0)
    correct_threshold: float = 1.0  # a completion is correct when its first reward component >= this
    batch_size: int | None = hp(None, ge=1)
    at_start: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs"
    run_name: str | None = None
    checkpoint_every: int = hp(10, ge=0)
    keep_checkpoints: int = hp(1, ge=1)
    progress: bool = True
    plot: bool = True
    # trackers that also get every metrics row (TRL's name): tensorboard, mlflow, trackio, wandb, all or none
    report_to: list[str] | str = field(default_factory=list)

    def __post_init__(self) -> None:
        from lmpo.train.trackers import normalize_report_to

        self.report_to = normalize_report_to(self.report_to)


@dataclass
class PreferenceConfig:
    """``preference``: the offline preference stage (lmpo.train.preference, docs/preference.md). Set, it replaces
    collection and the RL update: each step takes ``pairs_per_step`` pairs of ``data`` and minimises ``loss``."""

    loss: dict[str, Any] = field(default_factory=lambda: {"name": "dpo"})  # a PREFERENCE_LOSSES name + its params
    data: dict[str, Any] | None = None  # the pair file and how to read it (lmpo.tasks.pairs.PairData)
    pairs_per_step: int = hp(8, ge=1)  # pairs per optimizer step (micro-batched by train.micro_batch_size)
    eval_pairs: int = hp(256, ge=0)  # held-out pairs scored at each evaluation (0: none)


@dataclass
class Config:
    method: str = "grpo"
    stage: str = "rl"  # rl | reward_model | prm: what `lmpo train` trains (scorer stages: lmpo.train.scorer_stage)
    scorer: dict[str, Any] = field(default_factory=dict)  # the scorer stages' data and options (ScorerStageConfig)
    perf: str = "fast"  # fast | reference: sets every speed knob left at auto (lmpo.engine)
    # auto (cuda when torch.cuda.is_available(), else cpu) | cpu | cuda | cuda:N; CUDA turns off the CPU-only knobs
    # and resolves model.autocast: auto to bf16 (lmpo.engine.device, docs/vllm.md "CUDA")
    device: str = "auto"
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
    preference: PreferenceConfig | None = None  # set: the offline preference stage instead of RL (method=dpo, ...)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)


def as_dict(obj: Any) -> Any:
    """``dataclasses.asdict`` with config keys (:func:`key_of`) for field names."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {key_of(f): as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


COMPONENT_SECTIONS = ("advantage", "loss", "aggregator")
COMPONENT_LISTS = ("selectors", "shapers", "planners")
NAMED_SECTIONS = (*COMPONENT_SECTIONS, "task", "preference.loss")  # a new name replaces the section whole


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


def deep_merge(base: dict, over: dict, top: bool | str = True) -> dict:
    """Merge ``over`` into a copy of ``base``. A named section (a component, ``task``, ``preference.loss``) whose
    ``name`` changes is replaced whole: the new component or task does not inherit the old one's hyper-parameters.
    ``top``: True at the top level, else the dotted path of ``base`` (False: a nested dict)."""
    out = copy.deepcopy(base)
    prefix = "" if top is True else f"{top}." if top else None
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            path = None if prefix is None else f"{prefix}{k}"
            if path in NAMED_SECTIONS and "name" in v and v["name"] != out[k].get("name"):
                out[k] = copy.deepcopy(v)
            else:
                out[k] = deep_merge(out[k], v, top=path or False)
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


class Origin:
    """Where each setting came from, for error messages: the command-line override that set it, else the file.

    ``origin(key)`` is a suffix like `` (in configs/tiny.yaml)`` or `` (from the command-line override
    "train.steps=x")``; ``str(origin)`` is the file's suffix (or "").
    """

    def __init__(self, path: str | Path | None = None, overrides: dict[str, str] | None = None):
        self.path, self.overrides = path, dict(overrides or {})

    def override_for(self, key: str) -> str | None:
        """The override that set ``key`` or a section holding it (``rewards[0].name`` -> ``rewards=...``)."""
        k = re.sub(r"\[\d+\]", "", key)
        while k:
            if k in self.overrides:
                return self.overrides[k]
            k = k.rpartition(".")[0]
        return None

    def __call__(self, key: str = "") -> str:
        ov = self.override_for(key) if key else None
        return f' (from the command-line override "{ov}")' if ov else str(self)

    def __str__(self) -> str:
        return f" (in {self.path})" if self.path else ""

    def of_message(self, msg: str) -> str:
        """The suffix for an error raised deeper down: the override whose key or quoted value the message names."""
        for key, text in self.overrides.items():
            value = text.partition("=")[2].strip()
            if key in msg or (value and f'"{value}"' in msg):
                return self(key)
        return str(self)


# --------------------------------------------------------------------------- typed conversion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, where: str, src: str | Origin = "") -> Any:
    """Check ``value`` against the type hint ``tp`` (converting YAML-ish strings like "1e-6"); error names ``where``
    and ``src`` (where the value came from; an :class:`Origin` only for a config section)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{src(where) if isinstance(src, Origin) else src} must be a mapping of keys, "
                              f"got {value!r}.")
        return _build_dataclass(tp, value, where, src)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        optional = [a for a in args if a is not type(None)]
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):  # an optional section: its own errors
            if not isinstance(value, dict):
                here = src(where) if isinstance(src, Origin) else src
                raise ConfigError(f"{where}{here} must be a mapping of keys or null, got {value!r}.")
            return coerce(value, optional[0], where, src)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where, src)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}{src} expects {' or '.join(_type_name(a) for a in args)}, got {value!r} ({type(value).__name__}).")
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


def _build_dataclass(cls: type, data: dict, where: str, src: str | Origin) -> Any:
    origin = src if isinstance(src, Origin) else None
    hints = typing.get_type_hints(cls)
    fields = {key_of(f): f.name for f in dataclasses.fields(cls)}  # config key -> field name
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        name = fields.get(key)
        here = (origin if _holds_dataclass(hints.get(name)) else origin(path)) if origin else src
        if name is None:
            raise ConfigError(
                f'Unknown config key "{path}"{here}.{did_you_mean(str(key), names)} '
                f"Valid keys{' under ' + where if where else ''}: {', '.join(names)}."
            )
        kwargs[name] = coerce(value, hints[name], path, here)
    return cls(**kwargs)


def _holds_dataclass(tp: Any) -> bool:
    """A config section: a dataclass, or an optional one (``AsyncConfig | None``)."""
    return dataclasses.is_dataclass(tp) or any(dataclasses.is_dataclass(a) for a in typing.get_args(tp))


# --------------------------------------------------------------------------- public API
def read_overrides(overrides: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``key=value`` overrides -> one nested dict (applied together, so their order never matters) and, per dotted
    key, the override as typed (for error messages)."""
    tree: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_path(tree, keys, value)
        texts[".".join(keys)] = ov
    return tree, texts


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a :class:`Config` from an optional YAML file and ``key=value`` overrides (see module docstring)."""
    from lmpo.methods.presets import PRESETS

    tree, texts = read_overrides(overrides or [])
    origin = Origin(path, texts)
    user = deep_merge(load_yaml(path) if path else {}, tree)
    method = user.get("method", Config.method)
    if not isinstance(method, str) or method not in PRESETS:
        raise ConfigError(
            f'Unknown method "{method}"{origin("method")}.{did_you_mean(str(method), PRESETS)} '
            f"Valid methods: {', '.join(sorted(PRESETS))}. Run `lmpo list` to see them with their papers."
        )
    merged = deep_merge(deep_merge(Config().to_dict(), PRESETS[method]), user)
    cfg = _build_dataclass(Config, merged, "", origin)
    validate(cfg, origin)
    from lmpo.engine import apply_perf

    apply_perf(cfg)
    return cfg


def component_args(section: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(f'Config section "{where}" must be a mapping with a "name" key, got {section!r}.')
    args = {k: v for k, v in section.items() if k != "name"}
    return str(section["name"]), {k: _numeric(v) for k, v in args.items()}


def fill_horizon(args: dict[str, Any], obj: Any, horizon: int) -> dict[str, Any]:
    """Components with a ``horizon`` hyper-parameter left unset get the generation budget (a length constant; per
    episode under ``rollout.mode: episodes``: ``max_new_tokens * max_turns``)."""
    if dataclasses.is_dataclass(obj) and "horizon" in {f.name for f in dataclasses.fields(obj)}:
        if args.get("horizon") is None:
            return {**args, "horizon": horizon}
    return args


def build_components(cfg: Config) -> dict[str, Any]:
    """Instantiate the configured components through the registries (validates names and hyper-parameters)."""
    import lmpo.methods  # noqa: F401  (registers components)
    from lmpo.registry import ADVANTAGES, AGGREGATORS, LOSSES, PLANNERS, SELECTORS, SHAPERS

    from lmpo.rollout.modes import policy_horizon

    horizon = policy_horizon(cfg.rollout.mode, cfg.rollout.mode_params, cfg.rollout.max_new_tokens)
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


def validate(cfg: Config, origin: Origin | None = None) -> None:
    """Range and choice checks that types alone cannot express; errors name the key, the value and the valid range
    or choices, and where the value came from (``origin``)."""
    origin = origin or Origin()
    check_ranges(cfg, origin)
    _check_choices(cfg, origin)
    pipeline = _checked_components(cfg, origin)
    if pipeline.plan.values and cfg.critic.model == "shared" and cfg.train.optimizer_in_backward is True:
        raise ConfigError("train.optimizer_in_backward=true cannot fold AdamW into backward beside a shared critic's "
                          "value head (critic.model: shared, needed by the advantage); set "
                          f"train.optimizer_in_backward to auto or false, or critic.model=separate"
                          f"{origin('train.optimizer_in_backward')}.")
    check_group_of_one(cfg, pipeline.advantage, pipeline.loss, origin)
    if cfg.preference is not None:
        from lmpo.train.preference import check_preference

        try:
            check_preference(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{origin.of_message(str(exc))}") from None
    if cfg.train.async_ is not None:
        from lmpo.train.async_rollouts import unsupported

        why = unsupported(cfg, pipeline)
        if why:
            key = next((k for k in origin.overrides if k.startswith("train.async")), "train.async")
            raise ConfigError(f"train.async cannot run this config: {why}{origin(key)}.")


def check_ranges(obj: Any, origin: Origin, where: str = "") -> None:
    """Every numeric setting against the range declared on its field (recursively through the config sections)."""
    for f in dataclasses.fields(obj):
        key, value = f"{where}.{key_of(f)}" if where else key_of(f), getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, origin, key)
            continue
        rng = range_of(f)
        if rng is None or isinstance(value, bool) or not isinstance(value, (int, float)) or rng.admits(value):
            continue  # None and non-numbers (e.g. "auto") are the type's business
        nullable = " or null" if type(None) in typing.get_args(typing.get_type_hints(type(obj))[f.name]) else ""
        note = f" ({RANGE_NOTES[key]})" if key in RANGE_NOTES else ""
        raise ConfigError(f"{key} must be {rng.describe()}{nullable}, got {value!r}{note}{origin(key)}.")


def _check_choices(cfg: Config, origin: Origin) -> None:
    from lmpo.ops import KL_ESTIMATORS

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(msg + origin(key) + ".")

    r, t = cfg.rollout, cfg.train
    need(cfg.stage in ("rl", "reward_model", "prm"), "stage",
         f'stage must be "rl" (policy training), "reward_model" (Bradley-Terry on pairs) or "prm" (a process reward '
         f"model on step labels), got {cfg.stage!r}{did_you_mean(str(cfg.stage), ['rl', 'reward_model', 'prm'])}")
    need(cfg.stage == "rl" or cfg.preference is None, "stage",
         f"stage={cfg.stage} trains a scorer; the preference section trains a policy on pairs: set one of them")
    need(t.dist.strategy in ("auto", "ddp", "fsdp2"), "train.dist.strategy",
         f'train.dist.strategy must be "auto", "ddp" or "fsdp2", got {t.dist.strategy!r}')
    need(t.dist.placement in ("local", "ray"), "train.dist.placement",
         f'train.dist.placement must be "local" (torchrun starts the ranks) or "ray", got {t.dist.placement!r}')
    need(r.backend in ("hf", "vllm"), "rollout.backend",
         f'rollout.backend must be "hf" (the in-process HuggingFace sampler) or "vllm", got {r.backend!r}')
    try:
        from lmpo.rollout.vllm import vllm_options

        vllm_options(r.vllm)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{origin.of_message(str(exc))}") from None
    need(r.backend == "hf" or r.mode in ("sample", "episodes"), "rollout.backend",
         f"rollout.mode={r.mode} samples inside lmpo's own decode loop and needs rollout.backend=hf (vllm serves the "
         "sample and episodes modes)")
    if r.backend == "vllm" and not vllm_options(r.vllm).url:
        try:
            from lmpo.rollout.vllm import require_vllm

            require_vllm()
        except ConfigError as exc:
            raise ConfigError(f"{exc}{origin('rollout.backend')}") from None
    try:
        from lmpo.rollout.modes import mode_options

        mode_options(r.mode, r.mode_params)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{origin.of_message(str(exc))}") from None
    need(t.threads is None or t.threads == "auto" or (isinstance(t.threads, int) and not isinstance(t.threads, bool)),
         "train.threads", f"train.threads must be auto, an integer >= 1, or 0/null for torch's default, got "
         f"{t.threads!r}")
    need(t.optimizer_in_backward in ("auto", True, False), "train.optimizer_in_backward",
         f"train.optimizer_in_backward must be auto, true or false, got {t.optimizer_in_backward!r}")
    rows = -(-r.prompts_per_step * r.num_generations // t.num_minibatches)
    need(t.optimizer_in_backward is not True or t.micro_batch_size is None or t.micro_batch_size >= rows,
         "train.micro_batch_size",
         f"train.optimizer_in_backward=true needs each optimizer step's rows ({rows}) in one backward, but "
         f"train.micro_batch_size={t.micro_batch_size} splits them; unset train.micro_batch_size or set "
         "train.optimizer_in_backward=false")
    schedulers = ["constant", "linear", "cosine"]
    need(t.lr_scheduler in schedulers, "train.lr_scheduler", f"train.lr_scheduler must be constant, linear or "
         f"cosine, got {t.lr_scheduler!r}{did_you_mean(t.lr_scheduler, schedulers)}")
    need(cfg.kl.estimator in KL_ESTIMATORS, "kl.estimator",
         f"kl.estimator must be one of {KL_ESTIMATORS}, got {cfg.kl.estimator!r}")
    need(cfg.kl.mode in ("loss", "reward"), "kl.mode", f'kl.mode must be "loss" or "reward", got {cfg.kl.mode!r}')
    need(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
         f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    for key in ("prepack", "decode_kernel", "lean_decode"):
        value = getattr(r, key)
        need(value in ("auto", True, False), f"rollout.{key}",
             f"rollout.{key} must be auto, true or false, got {value!r}")
    samplers = ["auto", "multinomial", "inverse_cdf"]
    need(r.sampler in samplers, "rollout.sampler", f"rollout.sampler must be auto, multinomial or inverse_cdf, "
         f"got {r.sampler!r}{did_you_mean(str(r.sampler), samplers)}")
    need(cfg.critic.model in ("shared", "separate"), "critic.model",
         f"critic.model must be shared or separate, got {cfg.critic.model!r}")
    m = cfg.model
    need(m.gradient_checkpointing in (True, False, "attention"), "model.gradient_checkpointing",
         f"model.gradient_checkpointing must be true, false or attention, got {m.gradient_checkpointing!r}")
    need(m.packed_forward in ("auto", True, False), "model.packed_forward",
         f"model.packed_forward must be auto, true or false, got {m.packed_forward!r}")
    from lmpo.engine import PERF_MODES
    from lmpo.engine.device import ATTN_CHOICES, DEVICE_CHOICES, valid_device_spec

    need(valid_device_spec(cfg.device), "device", f"device must be auto, cpu, cuda or cuda:<index>, got "
         f"{cfg.device!r}{did_you_mean(str(cfg.device), DEVICE_CHOICES)}")
    need(m.attn_implementation is None or m.attn_implementation in ATTN_CHOICES, "model.attn_implementation",
         f"model.attn_implementation must be auto, eager, sdpa or flash_attention_2, got {m.attn_implementation!r}"
         f"{did_you_mean(str(m.attn_implementation), ATTN_CHOICES)}")

    need(cfg.perf in PERF_MODES, "perf",
         f"perf must be fast or reference, got {cfg.perf!r}{did_you_mean(str(cfg.perf), PERF_MODES)}")
    need(m.autocast in (None, "auto", "float32", "bfloat16", "float16"), "model.autocast",
         f"model.autocast must be auto, float32, bfloat16, float16 or null, got {m.autocast!r}")


def _checked_components(cfg: Config, origin: Origin) -> Any:
    """The pipeline (components, their needs and the extension points); its errors say where the value came from."""
    from lmpo.pipeline import build_pipeline

    try:
        return build_pipeline(cfg)
    except ConfigError as exc:
        where = origin.of_message(str(exc))
        if where and where.strip() not in str(exc):
            raise ConfigError(f"{exc}{where}") from None
        raise


def group_of_one_batch(prompts: int = 4):
    """``prompts`` prompts with one sample each and different rewards: a batch of ``num_generations=1``."""
    import torch

    from lmpo.batch import RolloutBatch

    b, t = prompts, 3
    mask = torch.ones(b, t, dtype=torch.bool)
    logprobs = torch.full((b, t), -1.0)
    return RolloutBatch(
        prompt_ids=torch.arange(b * 2).view(b, 2), prompt_mask=torch.ones(b, 2, dtype=torch.bool),
        response_ids=torch.arange(b * t).view(b, t), response_mask=mask, response_attn=mask.clone(),
        group_ids=torch.arange(b), rewards=torch.linspace(0.0, 1.0, b), sampler_logprobs=logprobs,
        old_logprobs=logprobs.clone(), ref_logprobs=logprobs.clone(), truncated=torch.zeros(b, dtype=torch.bool),
        extras={"entropy": torch.ones(b, t)},
    )


def learns_from_groups_of_one(advantage: Any, loss: Any, prompts: int = 4) -> bool | None:
    """Does a step whose prompts have one sample each (``num_generations=1``) give the policy any gradient?

    Decided by behaviour, never by name: copies of the built advantage and loss (their state untouched) run on
    :func:`group_of_one_batch` (``prompts`` rows), and the loss's gradient with respect to the log-probs is checked
    for a non-zero entry. Group-relative methods (GRPO, RLOO, VCPO, ...) centre each reward on its group's mean and
    give exactly zero; batch- or tracker-baselined ones (REINFORCE++, SPO) and losses that need no baseline (OTR)
    do not.
    ``None`` when the probe cannot tell (a component needs inputs the probe batch lacks).
    """
    import torch

    batch = group_of_one_batch(prompts)
    logprobs = (batch.old_logprobs + torch.linspace(-0.1, 0.1, batch.old_logprobs.numel()).view_as(batch.old_logprobs))
    logprobs.requires_grad_(True)
    try:
        batch = batch.replace(advantages=copy.deepcopy(advantage)(batch))
        per_token = copy.deepcopy(loss)(logprobs, batch).per_token
        (grad,) = torch.autograd.grad(per_token.sum(), logprobs, allow_unused=True)
    except Exception:  # noqa: BLE001 - a probe that cannot run decides nothing; the run itself reports real errors
        return None
    return grad is not None and bool(torch.isfinite(grad).all() and (grad != 0).any())


def check_group_of_one(cfg: Config, advantage: Any, loss: Any, origin: Origin) -> None:
    """``rollout.num_generations=1`` is an error when the method learns nothing from groups of one sample."""
    if cfg.rollout.num_generations != 1:
        return
    prompts = max(2, min(cfg.rollout.prompts_per_step, 64))  # the step's batch (a batch of one row never learns)
    if learns_from_groups_of_one(advantage, loss, prompts) is not False:
        return
    from lmpo.methods.presets import PRESETS

    single = sorted(n for n, p in PRESETS.items() if p.get("rollout", {}).get("num_generations") == 1)
    hint = f", or use a method built for one sample per prompt ({', '.join(f'method={n}' for n in single)})" \
        if single else ""
    raise ConfigError(
        f"rollout.num_generations=1 gives each prompt a group of one sample, and advantage "
        f'"{cfg.advantage["name"]}" with loss "{cfg.loss["name"]}" compares each sample with the others of its '
        f"group: a group of one has no learning signal (its gradient is 0) and training would change nothing. "
        f"Set rollout.num_generations to 2 or more (e.g. 8){hint}{origin('rollout.num_generations')}."
    )


def check_writable_folder(path: str | Path, key: str, shown: str | None = None) -> None:
    """``path`` is, or can be created as, a folder this process can write in; else a :class:`ConfigError` naming
    ``key`` and its value ``shown`` (default: ``path``). Nothing is created: the nearest existing folder is probed
    with a nameless temporary file."""
    path = Path(path)
    there = path
    while not there.exists() and there != there.parent:
        there = there.parent
    head = f"{key}={shown if shown is not None else path}"
    inside = f", so {str(path)!r} cannot be created" if there != path else ""
    if not there.is_dir():
        raise ConfigError(f"{head}: {str(there)!r} is a file, not a folder{inside}. Set {key} to a folder.")
    try:
        tempfile.TemporaryFile(dir=there).close()
    except OSError as exc:
        raise ConfigError(f"{head}: cannot write in {str(there)!r} ({exc.strerror or exc}){inside}. Set {key} to "
                          "a folder you can write to.") from None


def check_output_dir(cfg: Config, run: str | None = None) -> None:
    """``output.dir`` and the run folder ``run`` inside it must be writable folders (a config error, not a crash)."""
    check_writable_folder(cfg.output.dir, "output.dir")
    if run:
        check_writable_folder(Path(cfg.output.dir) / run, "output.run_name", run)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""Rollouts on vLLM (``rollout.backend: vllm``), in-process (colocated) or through its OpenAI-compatible server.

Both modes implement :class:`lmpo.rollout.base.Generator`: prompts (chat-formatted strings, or token ids for
multi-turn episodes) in, :class:`~lmpo.rollout.base.GenerationOutput` out, with the sampler's log-prob of every
generated token (``sampler_logprobs``) for the importance corrections. The engine starts lazily on the first
``generate``, from the trainer's weights at that moment (so a resumed run starts from its checkpoint), and
``sync_weights`` after each optimiser step sends it what changed (:func:`lmpo.rollout.weights.engine_weights`).

- ``colocated`` (default): ``vllm.LLM`` in this process (its engine core in a child process unless
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``); ``sync: rpc`` sends the tensors in memory through ``collective_rpc`` to the
  worker's ``model.load_weights`` (never through disk); ``sync: reload`` writes the changed tensors into the engine's
  model folder and asks the worker to reload them from it.
- ``server``: lmpo starts ``vllm serve`` in its own process group (always killed on exit, error or Ctrl-C, and by
  the kernel if lmpo dies: ``PR_SET_PDEATHSIG``), or uses ``rollout.vllm.url``; requests go to ``/v1/completions``
  with ``logprobs`` and token ids. Weight sync writes the changed tensors into the served folder and calls the
  dev-mode ``/collective_rpc`` endpoint to reload them (the server runs with ``VLLM_SERVER_DEV_MODE=1``).

vLLM reports, per ``logprobs_mode=processed_logprobs``, the log-prob under the distribution the token was drawn from
(after temperature, top-k and top-p), which is what ``sampler_logprobs`` means (:mod:`lmpo.rollout.base`).
docs/vllm.md has the install, the pins, and what was measured on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpo.errors import ConfigError, DataError, LmpoError, check_known_keys
from lmpo.rollout.base import GenerationOutput, SamplingParams
from lmpo.rollout.weights import engine_weights, export_folder, save_weights

INSTALL_HINT = "install the vllm extra into its own environment: make setup-vllm (docs/vllm.md)"
MODES = ("colocated", "server")
SYNCS = ("auto", "rpc", "reload")


class EngineError(LmpoError):
    """The inference engine failed to start, died, or returned something unusable."""


@dataclass
class VLLMOptions:
    """``rollout.vllm``: how lmpo runs vLLM (see the module docstring)."""

    mode: str = "colocated"  # colocated (vllm.LLM in-process) | server (vllm serve, OpenAI API)
    url: str | None = None  # server mode: use this running server (http://host:port) instead of starting one
    port: int = 0  # server mode: the port of the server lmpo starts (0 = a free one)
    host: str = "127.0.0.1"
    sync: str = "auto"  # weight sync: auto (rpc colocated, reload server) | rpc (in memory) | reload (via the folder)
    dtype: str | None = None  # the engine's dtype (None = model.dtype)
    max_model_len: int = 2048
    memory_gb: float = 2.0  # CPU: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.3  # GPU: the engine's share of device memory (colocated beside the trainer)
    enforce_eager: bool = True  # no graph capture/compilation (fast start; CPU decode of a small model gains little)
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    sleep_between_steps: bool = False  # GPU: put the engine to sleep while the trainer updates (frees its memory)
    extra_args: dict[str, Any] = field(default_factory=dict)  # more vllm.LLM keyword arguments / serve flags
    command: list[str] | None = None  # server mode: the command that starts the server (default: vllm serve ...);
    # {folder}, {host}, {port} are filled in

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"rollout.vllm.mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.sync not in SYNCS:
            raise ConfigError(f"rollout.vllm.sync must be one of {', '.join(SYNCS)}, got {self.sync!r}.")
        if self.mode == "server" and self.sync == "rpc":
            raise ConfigError("rollout.vllm.sync=rpc needs rollout.vllm.mode=colocated (a server reloads its weights "
                              "from its folder: sync=reload or auto).")
        if not (0 <= int(self.port) < 65536):
            raise ConfigError(f"rollout.vllm.port must be in [0, 65535] (0 = a free port), got {self.port}.")
        if self.url is not None and not str(self.url).startswith(("http://", "https://")):
            raise ConfigError(f"rollout.vllm.url must start with http:// or https://, got {self.url!r}.")
        for key in ("max_model_len", "startup_timeout_s", "request_timeout_s", "memory_gb"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"rollout.vllm.{key} must be > 0, got {getattr(self, key)!r}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization!r}.")
        if not isinstance(self.extra_args, dict):
            raise ConfigError(f"rollout.vllm.extra_args must be a mapping, got {self.extra_args!r}.")


def vllm_options(params: dict[str, Any] | None) -> VLLMOptions:
    """``rollout.vllm`` validated (errors name the bad key)."""
    import dataclasses

    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"rollout.vllm must be a mapping of options, got {params!r}.")
    check_known_keys(params, [f.name for f in dataclasses.fields(VLLMOptions)], "rollout.vllm")
    return VLLMOptions(**params)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise ConfigError(f"rollout.backend=vllm needs vLLM, which is not importable here: {INSTALL_HINT}.")


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    from lmpo.rollout.hf import _eos_ids as hf_eos

    return hf_eos(model, tokenizer)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# ---------------------------------------------------------------------------------------------- the result
def build_output(prompt_ids: list[list[int]], rows: list[tuple[list[int], list[float], bool]], pad_id: int,
                 tokenizer, device: torch.device | str = "cpu") -> GenerationOutput:
    """A :class:`GenerationOutput` from per-row ``(token ids, their log-probs, truncated)`` (what an engine returns).

    Raises :class:`EngineError` for malformed rows (lengths that differ, non-finite or positive log-probs)."""
    if len(rows) != len(prompt_ids):
        raise EngineError(f"the engine returned {len(rows)} completions for {len(prompt_ids)} prompts.")
    for i, (ids, lps, _) in enumerate(rows):
        if len(ids) != len(lps):
            raise EngineError(f"the engine returned {len(ids)} tokens but {len(lps)} log-probs for prompt {i}.")
        bad = [x for x in lps if not (x == x and x <= 1e-4 and x != float("-inf"))]
        if bad:
            raise EngineError(f"the engine returned invalid log-probs for prompt {i} (e.g. {bad[0]!r}); expected "
                              "finite values <= 0.")
        if any((not isinstance(t, int)) or t < 0 for t in ids):
            raise EngineError(f"the engine returned invalid token ids for prompt {i}: {ids[:8]!r}.")
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r[0]) for r in rows))
    pids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompt_ids], dtype=torch.long)
    pmask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompt_ids], dtype=torch.bool)
    rids = torch.tensor([list(r[0]) + [pad_id] * (T - len(r[0])) for r in rows], dtype=torch.long)
    attn = torch.tensor([[True] * len(r[0]) + [False] * (T - len(r[0])) for r in rows], dtype=torch.bool)
    lps = torch.tensor([list(r[1]) + [0.0] * (T - len(r[1])) for r in rows], dtype=torch.float32).clamp(max=0.0)
    completions = [tokenizer.decode(list(r[0]), skip_special_tokens=True) for r in rows]
    return GenerationOutput(prompt_ids=pids.to(device), prompt_mask=pmask.to(device), response_ids=rids.to(device),
                            response_attn=attn.to(device), sampler_logprobs=lps.to(device),
                            truncated=torch.tensor([bool(r[2]) for r in rows], device=device),
                            completions=completions, num_generated_tokens=int(attn.sum()))


# ---------------------------------------------------------------------------------------------- the generator
class VLLMGenerator:
    """A :class:`~lmpo.rollout.base.Generator` on vLLM (module docstring).

    Args:
        model: the trainer's policy (optionally peft-wrapped); read for the engine's start and for each sync.
        tokenizer: its tokenizer (prompts are encoded here, without special tokens, as :class:`HFGenerator` does).
        options: :class:`VLLMOptions` (``rollout.vllm``).
        workdir: where the engine's model folder goes (a temporary folder, removed on close, by default).
        seed: the engine's sampling seed.
    """

    def __init__(self, model: nn.Module, tokenizer, options: VLLMOptions | None = None, workdir: str | None = None,
                 seed: int = 0, dtype: str = "float32") -> None:
        if tokenizer.pad_token_id is None:
            raise DataError("The tokenizer has no pad token; load models with lmpo.models.load_model, which sets one.")
        self.model, self.tokenizer = model, tokenizer
        self.options = options or VLLMOptions()
        if self.options.mode == "colocated" or (self.options.url is None and self.options.command is None):
            require_vllm()
        self.seed = int(seed)
        self.dtype = self.options.dtype or dtype
        self.eos_ids = _eos_ids(model, tokenizer)
        self._own_dir = workdir is None
        self._workdir = Path(workdir) if workdir else None
        self._engine = None  # colocated: vllm.LLM; server: lmpo.rollout.vllm_server.Server
        self._calls = 0
        self._stale = False
        self.last_sync_s: float | None = None
        self.sync_method: str | None = None
        self._finalizer = None

    # -------------------------------------------------------------- lifecycle
    @property
    def started(self) -> bool:
        return self._engine is not None

    @property
    def folder(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="lmpo-vllm-"))
        return self._workdir / "model"

    def start(self) -> None:
        """Export the current weights and start the engine (``generate`` does it on first use)."""
        if self._engine is not None:
            return
        o = self.options
        if not (o.mode == "server" and o.url):
            export_folder(self.model, self.tokenizer, self.folder, self.dtype)
        if o.mode == "colocated":
            self._engine = _start_colocated(self.folder, o, self.seed, self.dtype)
        else:
            from lmpo.rollout.vllm_server import Server

            self._engine = Server(self.folder, o, self.seed, self.dtype)
        self._finalizer = weakref.finalize(self, _close_engine, self._engine, self._workdir if self._own_dir else None)
        self._stale = False

    def close(self) -> None:
        """Stop the engine (its processes too) and remove the temporary folder; safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()
        elif self._own_dir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._engine, self._finalizer = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- weight sync
    def sync_weights(self) -> None:
        """Send the trainer's changed weights to the engine (timed: ``last_sync_s``, method: ``sync_method``)."""
        if self._engine is None:  # the engine starts from the current weights anyway
            return
        t0 = time.perf_counter()
        # every tensor: vLLM's in-place reload re-processes whole layers (its CPU linears keep packed oneDNN copies);
        # in memory these are references to the trainer's tensors (LoRA layers merged), not copies
        weights = engine_weights(self.model, only_trainable=False, dtype=getattr(torch, self.dtype))
        o = self.options
        method = o.sync if o.sync != "auto" else ("rpc" if o.mode == "colocated" else "reload")
        if o.mode == "colocated":
            _sync_colocated(self._engine, weights, method, self.folder)
        else:
            self._engine.sync(weights, self.folder)
        self.last_sync_s, self.sync_method = time.perf_counter() - t0, method

    # -------------------------------------------------------------- generation
    def _encode(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        if prompts and not isinstance(prompts[0], str):
            ids = [list(map(int, p)) for p in prompts]
        else:
            ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        empty = [i for i, p in enumerate(ids) if not p]
        if empty:
            raise DataError(f"Prompt(s) at index {empty} encode to zero tokens.")
        return ids

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> GenerationOutput:
        """One completion per prompt (string, or token ids taken as they are); ``max_new_tokens`` per row optional."""
        if not prompts:
            raise DataError("VLLMGenerator.generate got an empty list of prompts.")
        limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * len(prompts)
        if len(limits) != len(prompts) or min(limits) < 1:
            raise DataError(f"VLLMGenerator.generate: max_new_tokens needs one limit >= 1 per prompt "
                            f"({len(prompts)}), got {limits[:8]}.")
        ids = self._encode(prompts)
        too_long = [i for i, (p, n) in enumerate(zip(ids, limits)) if len(p) + n > self.options.max_model_len]
        if too_long:
            i = too_long[0]
            raise DataError(f"Prompt {i} ({len(ids[i])} tokens) plus {limits[i]} new tokens exceeds "
                            f"rollout.vllm.max_model_len={self.options.max_model_len}; raise it.")
        self.start()
        self._calls += 1
        # a seed per call and row: reproducible runs, different draws for repeated prompts and steps
        seeds = [(self.seed * 1_000_003 + self._calls * 10_007 + i) % (2**31) for i in range(len(ids))]
        rows = self._engine_generate(ids, params, limits, seeds)
        device = next(self.model.parameters()).device
        return build_output(ids, rows, int(self.tokenizer.pad_token_id), self.tokenizer, device)

    def _engine_generate(self, ids, params, limits, seeds):
        if self.options.mode == "colocated":
            return _generate_colocated(self._engine, ids, params, limits, seeds, self.eos_ids)
        return self._engine.generate(ids, params, limits, seeds, self.eos_ids)


def _close_engine(engine, workdir: Path | None) -> None:
    from lmpo.rollout.vllm_server import Server

    try:
        if isinstance(engine, Server):
            engine.stop()
        elif engine is not None:
            _shutdown_llm(engine)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- colocated
def engine_env(o: VLLMOptions) -> dict[str, str]:
    """Environment settings the engine needs here (only where the user has not set them).

    ``OMP_NUM_THREADS``: vLLM's CPU kernels run OpenMP regions of as many threads as there are cores unless told;
    on a shared machine each region then waits for a descheduled thread, measured 10x slower per decode step
    (docs/vllm.md). The count is torch's (what ``train.threads`` chose)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(o.memory_gb)))),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return {k: v for k, v in env.items() if k not in os.environ}


def cpu_scheduler_args(o: VLLMOptions) -> dict[str, Any]:
    """Scheduler settings of a CPU engine (``{}`` where CUDA is available), under ``rollout.vllm.extra_args``.

    lmpo gives every request its own seed (reproducible rows). vLLM then keeps a ``torch.Generator`` per request, and
    when a step computes only part of a prompt (chunked prefill: a batch whose prompts exceed
    ``max_num_batched_tokens``, e.g. 128 rows of the default run's prompts) it discards that request's sampled token
    and rewinds its generator with ``set_offset``, which only CUDA's Philox generators have: a CPU generator raises
    "CPU Generator does not use offset" (``GPUModelRunner._bookkeeping_sync`` in vLLM 0.32; docs/vllm.md). Without
    chunked prefill every prompt is computed whole in one step, nothing is discarded and nothing rewinds (the budget
    must then hold the longest sequence: ``max_num_batched_tokens >= max_model_len``; 4096 is what
    vLLM 0.32 picks for the CPU `LLM` itself)."""
    if torch.cuda.is_available():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(int(o.max_model_len), 4096)}


def _start_colocated(folder: Path, o: VLLMOptions, seed: int, dtype: str):
    require_vllm()
    os.environ.update(engine_env(o))
    # the engine core in this process: no spawned child (whose main-module import a script may not guard), and the
    # weight sync hands the worker the trainer's tensors directly
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    kwargs: dict[str, Any] = dict(model=str(folder), tokenizer=str(folder), dtype=dtype, seed=seed,
                                  max_model_len=o.max_model_len, enforce_eager=o.enforce_eager,
                                  logprobs_mode="processed_logprobs", max_logprobs=0)
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = o.sleep_between_steps
    kwargs.update(cpu_scheduler_args(o))  # per-request seeds on the CPU engine (the 128-row batch failure)
    kwargs.update(o.extra_args)
    set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide; lmpo's thread tuning needs it
    try:
        return vllm.LLM(**kwargs)
    except Exception as exc:  # vLLM raises many types (ValueError, RuntimeError, its own); one clear message
        raise EngineError(f"vLLM could not start on {folder} ({type(exc).__name__}: {exc}). Check the model is one "
                          "vLLM supports, rollout.vllm.memory_gb / gpu_memory_utilization, and docs/vllm.md.") from exc
    finally:
        torch.set_num_threads = set_threads


def _vllm_params(params: SamplingParams, limit: int, seed: int, eos_ids: list[int]):
    from vllm import SamplingParams as VSP

    greedy = params.is_greedy
    return VSP(temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
               top_k=params.top_k if params.top_k > 0 and not greedy else _top_k_off(),
               max_tokens=int(limit), logprobs=0, seed=None if greedy else seed, stop_token_ids=list(eos_ids),
               ignore_eos=False, skip_special_tokens=True, detokenize=False)


@functools.lru_cache(maxsize=1)
def _top_k_off() -> int:
    """The value of ``top_k`` that turns it off in the installed vLLM (-1 in older releases, 0 in newer)."""
    from vllm import SamplingParams as VSP

    try:
        VSP(top_k=-1)
        return -1
    except Exception:
        return 0


def _generate_colocated(llm, ids: list[list[int]], params: SamplingParams, limits: list[int], seeds: list[int],
                        eos_ids: list[int]):
    from vllm.inputs import TokensPrompt

    sps = [_vllm_params(params, n, s, eos_ids) for n, s in zip(limits, seeds)]
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], sps, use_tqdm=False)
    except Exception as exc:
        raise EngineError(f"vLLM failed while generating ({type(exc).__name__}: {exc}); the run can be resumed "
                          "from its last checkpoint with --resume.") from exc
    return [_row(o.outputs[0], greedy_temperature=None) for o in outs]


def _row(c, greedy_temperature=None) -> tuple[list[int], list[float], bool]:
    toks = list(c.token_ids)
    if c.logprobs is None:
        raise EngineError("vLLM returned no log-probs (the request asked for logprobs=0).")
    lps = []
    for t, d in zip(toks, c.logprobs):
        entry = d.get(t) if d is not None else None
        if entry is None:
            raise EngineError(f"vLLM's log-probs miss the sampled token {t}.")
        lps.append(float(entry.logprob))
    return toks, lps, c.finish_reason == "length"


def _worker_load(worker, weights: dict):
    """Runs inside vLLM's worker (``collective_rpc``): load ``weights`` (HF names) into its model, in place."""
    from lmpo.rollout.vllm_worker import load_weights

    return load_weights(worker, weights)


def _worker_load_file(worker, path: str):
    """Runs inside vLLM's worker: load the tensors of one safetensors file (HF names) into its model."""
    from lmpo.rollout.vllm_worker import load_weights_file

    return load_weights_file(worker, path)


def _sync_colocated(llm, weights: dict[str, torch.Tensor], method: str, folder: Path) -> None:
    try:
        if method == "rpc":
            llm.collective_rpc(_worker_load, args=(weights,))
        else:
            path = save_weights(weights, folder / "lmpo-update.safetensors")
            llm.collective_rpc(_worker_load_file, args=(str(path),))
        llm.reset_prefix_cache()  # cached prompt keys/values were computed with the old weights
    except Exception as exc:
        raise EngineError(f"vLLM weight sync ({method}) failed ({type(exc).__name__}: {exc}).") from exc


def _shutdown_llm(llm) -> None:
    with contextlib.suppress(Exception):
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    with contextlib.suppress(Exception):
        del llm

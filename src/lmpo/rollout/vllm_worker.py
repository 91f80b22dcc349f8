"""Code that runs inside vLLM's worker process (``--worker-extension-cls``, or ``collective_rpc`` callables).

Kept free of lmpo's heavier imports: the worker imports this module by name.
"""

from __future__ import annotations


def load_weights(worker, weights: dict) -> int:
    """Load ``weights`` (Hugging Face names) into the worker's model in place: vLLM's ``reload_weights``, which runs
    each layer's post-load processing again (its CPU linears keep packed oneDNN copies of the weights)."""
    worker.model_runner.reload_weights(weights_iterator=iter(list(weights.items())), is_checkpoint_format=True)
    return len(weights)


def load_weights_file(worker, path: str) -> int:
    """Load the tensors of one safetensors file (Hugging Face names) into the worker's model, in place."""
    from safetensors.torch import load_file

    return load_weights(worker, load_file(path))


class LmpoWorkerExtension:
    """Methods vLLM mixes into its worker class; the server's dev-mode ``/collective_rpc`` calls them by name."""

    def lmpo_load_weights_file(self, path: str) -> int:
        return load_weights_file(self, path)

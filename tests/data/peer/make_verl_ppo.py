"""Numbers computed once by verl's own PPO functions, for tests/unit/methods/advantage/test_gae.py (peer parity).

verl (0.9.1) computes GAE and the clipped value loss in ``verl/trainer/ppo/core_algos.py``
(``compute_gae_advantage_return``, ``compute_value_loss``). Importing the ``verl`` package pulls in ray, tensordict,
omegaconf and more, so this script loads just that file and ``verl/utils/torch_functional.py`` (the masked
statistics it calls) from a ``pip install --no-deps --target DIR verl``, with the unrelated imports stubbed. Nothing
of verl is copied: its functions run as shipped. Run:

    /work/main/.venv/bin/python -m pip install --no-deps --target /tmp/verlpkg verl==0.9.1
    VERL_DIR=/tmp/verlpkg/verl python tests/data/peer/make_verl_ppo.py   # writes tests/data/peer/verl_ppo.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch

VERL = Path(os.environ.get("VERL_DIR", "/tmp/verlpkg/verl"))


def stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []  # a package, so submodules resolve to further stubs
    sys.modules[name] = mod
    return mod


def load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class _Any:  # stands for config classes only used in annotations
    def __init__(self, *a, **k):
        pass


def verl_functions():
    stub("omegaconf", DictConfig=_Any, OmegaConf=_Any, ListConfig=_Any)
    stub("tensordict", TensorDict=_Any)
    stub("verl")
    stub("verl.utils", as_torch_index=None, group_mean_std=None)
    stub("verl.utils.device", get_device_name=lambda: "cpu", get_torch_device=lambda: torch.cpu,
         is_npu_available=False, is_cuda_available=False)
    stub("verl.utils.import_utils", deprecated=lambda *a, **k: (lambda f: f))
    stub("verl.trainer")
    stub("verl.trainer.ppo")
    stub("verl.trainer.config", AlgoConfig=_Any)
    stub("verl.workers")
    stub("verl.workers.config", ActorConfig=_Any)
    F = load("verl.utils.torch_functional", VERL / "utils" / "torch_functional.py")
    sys.modules["verl.utils"].torch_functional = F
    return load("verl.trainer.ppo.core_algos", VERL / "trainer" / "ppo" / "core_algos.py")


def main() -> None:
    ca = verl_functions()
    g = torch.Generator().manual_seed(7)
    B, T = 6, 9
    mask = torch.rand(B, T, generator=g) < 0.8
    lengths = torch.tensor([9, 7, 5, 9, 3, 6])
    mask &= torch.arange(T)[None, :] < lengths[:, None]  # right padding, plus holes (observation tokens)
    mask[:, 0] = True
    token_rewards = torch.randn(B, T, generator=g) * 0.1 * mask
    values = torch.randn(B, T, generator=g) * mask
    outcome = torch.randn(B, generator=g)
    last = torch.where(mask, torch.arange(T), -1).amax(-1)
    dense = token_rewards.clone()
    dense[torch.arange(B), last] += outcome  # verl's reward manager puts the score on the last response token
    cases = []
    for gamma, lam in ((1.0, 0.95), (0.9, 0.7), (1.0, 1.0)):
        adv, ret = ca.compute_gae_advantage_return(dense, values, mask.float(), torch.tensor(gamma),
                                                   torch.tensor(lam))
        cases.append({"gamma": gamma, "lam": lam, "advantages": adv.tolist(), "returns": ret.tolist()})
    vpreds = values + 0.5 * torch.randn(B, T, generator=g)
    returns = values + torch.randn(B, T, generator=g)
    vf = []
    for clip in (0.2, 0.5):
        loss, clipfrac = ca.compute_value_loss(vpreds, returns, values, mask.float(), clip, loss_agg_mode="token-mean")
        vf.append({"cliprange_value": clip, "vf_loss": float(loss), "vf_clipfrac": float(clipfrac)})
    out = {"source": "verl 0.9.1 verl/trainer/ppo/core_algos.py (compute_gae_advantage_return, compute_value_loss)",
           "mask": mask.tolist(), "token_rewards": token_rewards.tolist(), "values": values.tolist(),
           "outcome": outcome.tolist(), "gae": cases, "vpreds": vpreds.tolist(), "vf_returns": returns.tolist(),
           "value_loss": vf}
    (Path(__file__).parent / "verl_ppo.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()

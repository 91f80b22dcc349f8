"""The offline preference stage: ``train(cfg)`` with a ``preference`` section (``method=dpo``, docs/preference.md).

    open (config checked, pairs read and tokenized, reference log-probs computed once, then the run folder)
    for each step: take pairs -> policy log-probs -> preference loss -> optimizer step -> evaluate -> checkpoint

It shares the RL loop's run folder, checkpoints (exact resume: weights, optimizer, scheduler, the pair stream's
position, RNG), metrics log, task evaluation and summary; only the step differs. The reference log-probs of every
pair are computed once, before training, by the model as loaded (with LoRA: the base model, since fresh adapters
are the identity), so no frozen copy of the model is kept and a resumed run gets the same numbers.

A loss whose ``needs`` hold ``"mismatched_logprobs"`` (KTO's KL estimate) also gets, per row, the summed log-probs
of a *mismatched* pair -- its prompt with its neighbour row's response (:func:`attach_mismatched`, once, before
training) -- under the reference (cached with the others) and under the policy (an extra no-grad forward per
micro-batch), in ``PreferenceBatch.mismatched_logps`` / ``mismatched_ref_logps``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from lmpo.batch import PreferenceBatch
from lmpo.config import Config, component_args
from lmpo.errors import ConfigError, DataError, TrainingDiverged
from lmpo.methods.base import PairLogps
from lmpo.models.logprobs import response_logprobs
from lmpo.ops import masked_sum
from lmpo.registry import PREFERENCE_LOSSES
from lmpo.tasks.pairs import PairData, collate_pairs
from lmpo.train.step import PolicyRunner, weights_finite


def check_preference(cfg: Config) -> tuple[Any, PairData | None]:
    """The preference loss (registry-checked) and the pair data settings of ``cfg.preference`` (``None`` when
    ``preference.data.path`` is unset: a preset loads without it; a run needs it, :func:`require_data`)."""
    import lmpo.methods  # noqa: F401  (registers the losses)
    from lmpo.config import _build_dataclass

    p = cfg.preference
    name, args = component_args(p.loss, "preference.loss")
    loss = PREFERENCE_LOSSES.build(name, where="preference.loss", **args)
    data = _build_dataclass(PairData, {"path": "", **(p.data or {})}, "preference.data", "")
    return loss, (data if data.path else None)


def require_data(data: PairData | None) -> PairData:
    if data is None:
        raise ConfigError("preference.data.path is not set: the preference stage reads its pairs from a JSONL / "
                          "Parquet file in TRL's format (prompt, chosen, rejected), e.g. "
                          "preference.data.path=pairs.jsonl (docs/preference.md).")
    return data


def on_device(batch: PreferenceBatch, device) -> PreferenceBatch:
    """The batch's tensors on ``device`` (the model's)."""
    if batch.prompt_ids.device == torch.device(device):
        return batch
    move = {k: getattr(batch, k).to(device) for k in ("prompt_ids", "chosen_ids", "chosen_mask", "rejected_ids",
                                                      "rejected_mask")}
    pm = batch.prompt_mask.to(device) if batch.prompt_mask is not None else None
    return PreferenceBatch(**move, prompt_mask=pm, meta=batch.meta)


def pair_logps(runner: PolicyRunner, batch: PreferenceBatch) -> PairLogps:
    """Per-token log-probs (temperature 1) of both responses of each pair, in one forward: rows interleaved
    (chosen_i, rejected_i) so the pair's two rows share their prompt pass."""
    N, Tc, Tr = batch.prompt_ids.shape[0], batch.chosen_ids.shape[1], batch.rejected_ids.shape[1]
    T = max(Tc, Tr)

    def both(c, r):
        return torch.stack((F.pad(c, (0, T - Tc)), F.pad(r, (0, T - Tr))), 1).view(2 * N, T)

    pmask = batch.prompt_mask if batch.prompt_mask is not None else torch.ones_like(batch.prompt_ids, dtype=torch.bool)
    with runner.autocast_ctx():
        lp, _ = response_logprobs(runner.model, batch.prompt_ids.repeat_interleave(2, 0),
                                  pmask.repeat_interleave(2, 0), both(batch.chosen_ids, batch.rejected_ids),
                                  both(batch.chosen_mask, batch.rejected_mask), chunk_size=runner.chunk_size,
                                  packed=runner.packed, recompute=runner.recompute)
    lp = lp.view(N, 2, T)
    return PairLogps(lp[:, 0, :Tc], lp[:, 1, :Tr])


def attach_mismatched(pairs: list[dict]) -> None:
    """Give each pair a mismatched response (``mismatched_ids``): the previous pair's (cyclically, as TRL rotates
    completions by one), its chosen side on even rows and its rejected side on odd ones where it has both."""
    if len(pairs) < 2:
        raise DataError(f"The KL estimate of preference.loss kto (reference_point=mismatched) pairs each prompt with "
                        f"another example's response, but the data set has {len(pairs)} usable example; add examples "
                        "or set preference.loss.reference_point=batch.")
    for i, p in enumerate(pairs):
        q = pairs[i - 1]
        side = "chosen" if q["chosen_ids"] and (i % 2 == 0 or not q["rejected_ids"]) else "rejected"
        p["mismatched_ids"] = q[f"{side}_ids"]


def mismatched_logps(runner: PolicyRunner, pairs: list[dict], batch: PreferenceBatch) -> torch.Tensor:
    """(N,) summed log-probs (temperature 1, no gradient) of each pair's prompt followed by its ``mismatched_ids``."""
    T = max(len(p["mismatched_ids"]) for p in pairs)
    ids = torch.zeros(len(pairs), T, dtype=torch.long)
    mask = torch.zeros(len(pairs), T, dtype=torch.bool)
    for i, p in enumerate(pairs):
        ids[i, :len(p["mismatched_ids"])] = torch.tensor(p["mismatched_ids"], dtype=torch.long)
        mask[i, :len(p["mismatched_ids"])] = True
    ids, mask = ids.to(batch.prompt_ids.device), mask.to(batch.prompt_ids.device)
    pmask = batch.prompt_mask if batch.prompt_mask is not None else torch.ones_like(batch.prompt_ids, dtype=torch.bool)
    with torch.no_grad(), runner.autocast_ctx():
        lp, _ = response_logprobs(runner.model, batch.prompt_ids, pmask, ids, mask, chunk_size=runner.chunk_size,
                                  packed=runner.packed, recompute=runner.recompute)
    return masked_sum(lp.float(), mask, -1)


@torch.no_grad()
def cache_logps(runner: PolicyRunner, pairs: list[dict], pad_id: int, size: int) -> None:
    """Store each pair's per-token log-probs under the current weights in the pair (``ref_chosen``/``ref_rejected``)."""
    for i in range(0, len(pairs), size):
        part = pairs[i:i + size]
        lp = pair_logps(runner, collate_pairs(part, pad_id))
        lp = PairLogps(lp.chosen.cpu(), lp.rejected.cpu())
        kl = mismatched_logps(runner, part, on_device(collate_pairs(part, pad_id), runner.device)) \
            if "mismatched_ids" in part[0] else None
        for j, p in enumerate(part):
            p["ref_chosen"] = lp.chosen[j, :len(p["chosen_ids"])].clone()
            p["ref_rejected"] = lp.rejected[j, :len(p["rejected_ids"])].clone()
            if kl is not None:
                p["ref_mismatched"] = float(kl[j])


def cached_ref(pairs: list[dict], batch: PreferenceBatch) -> PairLogps:
    def pad(key, like):
        return torch.stack([F.pad(p[key], (0, like.shape[1] - p[key].numel())) for p in pairs])

    return PairLogps(pad("ref_chosen", batch.chosen_ids).to(batch.chosen_ids.device),
                     pad("ref_rejected", batch.rejected_ids).to(batch.rejected_ids.device))


@dataclass
class PairStep:
    """What a preference step needs: the loss, the runner, the optimizer and the micro-batch size."""

    loss: Any
    runner: PolicyRunner
    opt: Any
    pad_id: int
    micro_batch_size: int | None = None
    eval_batch_size: int = 16  # held-out pairs per no-grad forward when micro_batch_size is unset

    def micro(self, pairs: list[dict], size: int | None = None) -> list[list[dict]]:
        size = size or self.micro_batch_size or len(pairs)
        return [pairs[i:i + size] for i in range(0, len(pairs), size)]

    def collate(self, pairs: list[dict]) -> PreferenceBatch:
        """The pairs as a batch on the model's device, with the mismatched pairs' log-probs where the loss needs
        them (policy: a no-grad forward now; reference: cached)."""
        batch = on_device(collate_pairs(pairs, self.pad_id), self.runner.device)
        if "mismatched_logprobs" not in self.loss.needs:
            return batch
        ref = torch.tensor([p["ref_mismatched"] for p in pairs], dtype=torch.float32, device=batch.prompt_ids.device)
        return replace(batch, mismatched_logps=mismatched_logps(self.runner, pairs, batch), mismatched_ref_logps=ref)

    def loss_of(self, pairs: list[dict], total: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed per-pair loss of ``pairs`` divided by ``total`` (the step's pair count), and its metrics."""
        batch = self.collate(pairs)
        policy = pair_logps(self.runner, batch)
        ref = cached_ref(pairs, batch) if "ref_logprobs" in self.loss.needs else None
        out = self.loss(batch, policy, ref)
        metrics = dict(out.metrics)
        metrics["logps/chosen"] = masked_sum(policy.chosen.detach(), batch.chosen_mask, -1).mean()
        metrics["logps/rejected"] = masked_sum(policy.rejected.detach(), batch.rejected_mask, -1).mean()
        return out.per_pair.sum() / total, metrics

    def __call__(self, pairs: list[dict], step: int) -> dict[str, Any]:
        """One optimizer step on ``pairs`` (their mean loss); the metrics averaged over micro-batches by size."""
        opt = self.opt
        opt.zero_grad()
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros(())
        parts = self.micro(pairs)
        for part in parts:
            loss, metrics = self.loss_of(part, len(pairs))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"The preference loss became {loss.item()} at step {step}; no update was "
                                       "applied. Lower train.learning_rate, then resume with --resume.")
            opt.backward(loss, whole=len(parts) == 1)
            total = total + loss.detach().cpu()
            for k, v in metrics.items():
                sums[k] = sums.get(k, torch.zeros(())) + v.float().cpu() * len(part) / len(pairs)
        grad_norm = opt.clip()
        if not torch.isfinite(grad_norm):
            opt.zero_grad()
            raise TrainingDiverged(f"The gradient norm became {grad_norm.item()} at step {step}; no update was "
                                   "applied. Lower train.learning_rate, then resume with --resume.")
        lr = opt.lr
        opt.step(None)
        if not weights_finite(opt.params):
            raise TrainingDiverged(f"The weights became non-finite at step {step} (learning rate {lr:g}); this step "
                                   "is not saved. Lower train.learning_rate, then resume.")
        opt.zero_grad()
        return {**sums, "loss/total": total, "loss/grad_norm": grad_norm.detach(), "loss/lr": torch.tensor(lr)}

    @torch.no_grad()
    def evaluate(self, pairs: list[dict]) -> dict[str, float]:
        """Held-out pairs: the loss, and how often the policy ranks chosen over rejected, against the reference
        (``eval/reward_accuracy``: DPO's implicit reward) and by its own summed log-probs (``eval/logp_accuracy``);
        the rankings over the rows that hold both responses (unpaired rows have one)."""
        if not pairs:
            return {}
        loss_sum, ranked, sums = 0.0, 0, {"eval/reward_accuracy": 0.0, "eval/reward_margin": 0.0,
                                          "eval/logp_accuracy": 0.0}
        for part in self.micro(pairs, self.micro_batch_size or self.eval_batch_size):
            batch = self.collate(part)
            policy, ref = pair_logps(self.runner, batch), cached_ref(part, batch)
            out = self.loss(batch, policy, ref if "ref_logprobs" in self.loss.needs else None)
            loss_sum += float(out.per_pair.sum())
            both = batch.chosen_mask.any(-1) & batch.rejected_mask.any(-1)
            c = masked_sum(policy.chosen, batch.chosen_mask, -1)
            r = masked_sum(policy.rejected, batch.rejected_mask, -1)
            dc, dr = c - masked_sum(ref.chosen, batch.chosen_mask, -1), r - masked_sum(ref.rejected, batch.rejected_mask, -1)
            ranked += int(both.sum())
            for k, v in (("eval/reward_accuracy", (dc > dr).float()), ("eval/reward_margin", dc - dr),
                         ("eval/logp_accuracy", (c > r).float())):
                sums[k] += float(v[both].sum())
        out = {"eval/pref_loss": loss_sum / len(pairs)}
        if ranked:
            out.update({k: v / ranked for k, v in sums.items()})
        return out


def train_preference(cfg: Config, folder, plan):
    """Open the preference run (everything validated before the folder is written), run its steps, finish."""
    from lmpo.train.preference_run import open_preference_run, run_preference_steps
    from lmpo.train.loop import close_generators
    from lmpo.train.trackers import close_log

    run = open_preference_run(cfg, folder, plan)
    try:
        return run_preference_steps(run)
    finally:
        try:
            close_generators(run.ctx)
        finally:
            close_log(run.log)

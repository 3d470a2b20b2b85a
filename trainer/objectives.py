"""Objectives that learn from ratings using only what serving produced (DESIGN §4): the sampled
tokens, their serving-time logprobs, and the trainer's own response-token logprobs. None runs a
reference model. Pure functions over lists of per-record response logprobs `[R_i]`; all math in fp32
and without host syncs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.errors import ConfigError, InvalidRequestError


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[t] | ...) from logits [T, V] and targets [T] -> [T] fp32."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise InvalidRequestError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
                                  "need logits [T, V] and targets [T]")
    logp = F.log_softmax(logits.float(), dim=-1)                            # [T, V]
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)        # [T]


def _check(logp: list[torch.Tensor], per_record: torch.Tensor, what: str,
           paired: list[torch.Tensor] | None = None, paired_name: str = "") -> None:
    """InvalidRequestError unless logp is a non-empty list of [R_i] with one `per_record` value each
    (and `paired` holds the same shapes)."""
    if len(logp) == 0:
        raise InvalidRequestError("the batch has no records")
    if any(t.dim() != 1 for t in logp):
        raise InvalidRequestError("each record's logprobs must be 1-d [R_i]")
    if per_record.shape != (len(logp),):
        raise InvalidRequestError(f"{what} has shape {tuple(per_record.shape)}: need one value per record "
                                  f"[{len(logp)}]")
    if paired is None:
        return
    if len(paired) != len(logp) or any(a.shape != b.shape for a, b in zip(logp, paired)):
        raise InvalidRequestError(f"logp and {paired_name} must hold the same records with the same lengths")


def _flat(logp: list[torch.Tensor], per_record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate records -> tokens [N] fp32 and broadcast `per_record` [B] to its tokens -> [N]."""
    tokens = torch.cat([t.float() for t in logp])                            # [N]
    lengths = torch.tensor([t.numel() for t in logp], device=tokens.device)  # [B]
    per_token = per_record.float().to(tokens.device).repeat_interleave(lengths, output_size=tokens.numel())
    return tokens, per_token                                                 # [N], [N]


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 when den is 0 (num is then 0 too), finite gradients, no host sync."""
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def sft_loss(logp: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Rating-weighted token NLL: sum_i w_i * sum_t -logp_it / sum_i w_i * R_i over records with w_i > 0.

    Each token of record i counts with weight w_i (so records of any length share one per-token
    mean); records with w_i <= 0 (rated bad or neutral) contribute nothing. 0 if none is included.
    """
    _check(logp, weights, "weights")
    tokens, w_tok = _flat(logp, weights.float().clamp_min(0.0))             # [N], [N]
    return _safe_div(-(w_tok * tokens).sum(), w_tok.sum())


def kto_loss(logp: list[torch.Tensor], ref_logp: list[torch.Tensor], desirable: torch.Tensor,
             beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0,
             kl_ref: float | torch.Tensor = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KTO with the serving-time logprobs as reference.

    r_i = beta * sum_t (logp_it - ref_it); z0 = max(kl_ref, 0), detached, in the units of r (i.e.
    beta * KL estimate); value_i = lambda_d * sigmoid(r_i - z0) if desirable else
    lambda_u * sigmoid(z0 - r_i); loss = mean_i w_i * (lambda_i - value_i), w_i the record's weight
    [B] (how strongly it was rated: |reward|; default 1).
    """
    for name, v in (("beta", beta), ("lambda_d", lambda_d), ("lambda_u", lambda_u)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"kto {name}={v!r}: use a positive number")
    _check(logp, desirable, "desirable", ref_logp, "ref_logp")
    device = logp[0].device
    desirable = desirable.to(device=device, dtype=torch.bool)                 # [B]
    ratios = [(a.float() - b.detach().float().to(device)).sum() for a, b in zip(logp, ref_logp)]
    r = beta * torch.stack(ratios)                                           # [B]
    z0 = torch.as_tensor(kl_ref, dtype=torch.float32, device=device).detach().clamp_min(0.0)
    lam = torch.where(desirable, torch.tensor(float(lambda_d), device=device),
                      torch.tensor(float(lambda_u), device=device))          # [B]
    value = lam * torch.sigmoid(torch.where(desirable, r - z0, z0 - r))      # [B]
    if weights is None:
        return (lam - value).mean()
    _check(logp, weights, "weights")
    return (weights.float().to(device) * (lam - value)).mean()


def pg_loss(logp: list[torch.Tensor], old_logp: list[torch.Tensor], advantages: torch.Tensor,
            clip_eps: float = 0.2) -> torch.Tensor:
    """PPO-style clipped policy gradient against the serving-time logprobs, per token.

    ratio_t = exp(logp_t - old_t); loss = -mean over all response tokens of the batch of
    min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i), A_i the advantage of the token's record.
    """
    if not (isinstance(clip_eps, (int, float)) and 0 < clip_eps < 1):
        raise ConfigError(f"pg clip_eps={clip_eps!r}: use a number in (0, 1) such as 0.2")
    _check(logp, advantages, "advantages", old_logp, "old_logp")
    tokens, adv = _flat(logp, advantages)                                    # [N], [N]
    old = torch.cat([t.detach().float() for t in old_logp]).to(tokens.device)  # [N]
    ratio = torch.exp(tokens - old)                                          # [N]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    return -surrogate.sum() / max(tokens.numel(), 1)


class RunningMean:
    """Exponential moving average of rewards: the pg baseline (advantage = reward - mean).

    `update(rewards)` moves the mean towards the batch mean: mean <- m * mean + (1 - m) * batch_mean.
    """

    def __init__(self, momentum: float = 0.9, initial: float = 0.0):
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ConfigError(f"momentum={momentum!r}: use a number in [0, 1) such as 0.9")
        self.momentum = float(momentum)
        self.mean = float(initial)
        self.count = 0

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """rewards [B] -> rewards - mean [B] (fp32); does not update."""
        return rewards.float() - self.mean

    def update(self, rewards: torch.Tensor | list[float]) -> float:
        values = torch.as_tensor(rewards, dtype=torch.float64).flatten()
        if values.numel() == 0:
            return self.mean
        self.mean = self.momentum * self.mean + (1.0 - self.momentum) * values.mean().item()
        self.count += values.numel()
        return self.mean

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        missing = {"momentum", "mean", "count"} - set(state)
        if missing:
            raise ConfigError(f"RunningMean state lacks {sorted(missing)}: load a state saved by state_dict()")
        self.momentum, self.mean, self.count = float(state["momentum"]), float(state["mean"]), int(state["count"])


def batch_loss(config, baseline: RunningMean, logprobs: list[torch.Tensor], records: list) -> torch.Tensor:
    """The objective `config.objective` (a TrainerConfig's) over served records (those with a key) + SFT
    over user-written better answers (key None). records: trainer.reuse.TrainRecord, one per logprobs [R_i];
    a record's weight is its reward in [-1, 1] (thumbs and stars map to -1, 0, 1; a grader's reward is
    used as is): sft weighs good records by it, kto by its size, pg takes it as the reward."""
    device = logprobs[0].device
    served = [i for i, r in enumerate(records) if r.key is not None]
    better = [i for i, r in enumerate(records) if r.key is None]
    total = logprobs[0].sum() * 0.0
    if better:
        total = total + sft_loss([logprobs[i] for i in better], torch.ones(len(better), device=device))
    if not served:
        return total
    lp = [logprobs[i] for i in served]
    rewards = torch.tensor([records[i].weight for i in served], device=device)
    ref = [torch.tensor(records[i].serving_logprobs, device=device) for i in served]
    if config.objective == "sft":
        return total + sft_loss(lp, rewards)
    if config.objective == "kto":          # desirable if rated good; each record weighs |reward|
        return total + kto_loss(lp, ref, rewards > 0, beta=config.kto_beta, weights=rewards.abs())
    return total + pg_loss(lp, ref, baseline.advantages(rewards), clip_eps=config.pg_clip)

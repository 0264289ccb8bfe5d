"""Losses: soft-label DPO (RL-CAI) and token NLL (SL-CAI), plus the sequence log-probs they need.

Soft-label DPO (DESIGN.md section 2, RL-CAI item 7). With the judge's label p = p(chosen better)
and the policy-vs-reference margin

    d = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)),

the loss is the cross-entropy between the label and the Bradley-Terry probability sigmoid(beta d):

    loss = -[p log sigmoid(beta d) + (1 - p) log sigmoid(-beta d)].

With p = 1 it is the standard (sigmoid) DPO loss. Its gradient in d is beta (sigmoid(beta d) - p),
so training pulls sigmoid(beta d) towards the judge's confidence instead of pushing the margin
up without bound: a p = 0.5 pair is left where it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # label of tokens that do not count: the prompt and the padding


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's completion tokens, and how many there are.

    `logits[:, t]` predicts token t + 1; `labels` are the input ids with IGNORE on the prompt and
    the padding, so only completion tokens count.
    """
    targets = labels[:, 1:]
    # cross_entropy picks the target's log-prob without materialising a full log_softmax copy,
    # and gives 0 where the target is IGNORE.
    token_logps = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none"
    )
    return token_logps.sum(-1), (targets != IGNORE).sum(-1)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # mean over the pairs, differentiable
    per_pair: torch.Tensor  # each pair's loss, differentiable (for sums across micro-batches)
    margin: torch.Tensor  # d per pair, detached
    chosen_rewards: torch.Tensor  # beta * (log pi - log ref) of the chosen answers, detached
    rejected_rewards: torch.Tensor
    log_ratio: torch.Tensor  # mean of log pi - log ref over both answers: a per-sample KL estimate

    def metrics(self) -> dict[str, float]:
        """Means over the pairs, for the log."""
        return {
            "margin": float(self.margin.mean()),
            "accuracy": float((self.margin > 0).float().mean()),
            "reward_chosen": float(self.chosen_rewards.mean()),
            "reward_rejected": float(self.rejected_rewards.mean()),
            "kl": float(self.log_ratio.mean()),
        }


def soft_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    p_chosen: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """The soft-label DPO loss from summed sequence log-probs (each of shape [pairs])."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    p = p_chosen.to(d.dtype)
    # logsigmoid, not log(sigmoid(.)): stays finite for large margins.
    per_pair = -(p * F.logsigmoid(beta * d) + (1 - p) * F.logsigmoid(-beta * d))
    return DPOOutput(
        loss=per_pair.mean(),
        per_pair=per_pair,
        margin=d.detach(),
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
        log_ratio=((chosen_ratio + rejected_ratio) / 2).detach(),
    )

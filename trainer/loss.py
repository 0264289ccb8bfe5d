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
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of tokens that do not count: the prompt and the padding


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's completion tokens, and how many there are, from the
    logits of every position: the straightforward computation, which `completion_logps` must
    equal (the tests compare them).

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


LOGP_CHUNK = 512  # completion positions per LM-head chunk: 512 x 49,152 float32 logits = 96 MiB


def _chunk_logps(
    states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    logits = F.linear(states.float(), weight, bias)
    if softcap:  # models such as Gemma 2 squash their logits; their log-probs are of these
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def completion_logps(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = LOGP_CHUNK,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `sequence_logps` gives, from the last hidden states ([batch, length, hidden]) and the
    LM head's `weight` (and `bias`) instead of the logits, without ever holding the logits of
    every position: only the positions that predict a completion token are projected, `chunk` of
    them at a time, in float32.

    With gradients on, each chunk runs under activation checkpointing: autograd would otherwise
    keep every chunk's float32 log-softmax for the backward pass, which is the full
    completion-by-vocabulary table again. The backward pass recomputes one chunk at a time
    instead (one more LM-head product over the completion tokens), so the memory the head needs
    is about chunk x vocabulary whatever the sequence length.
    """
    targets = labels[:, 1:]
    counted = targets != IGNORE
    rows = counted.nonzero()[:, 0]  # the sequence of each completion token, in order
    states = hidden[:, :-1][counted]  # [completion tokens, hidden]: the prompts are dropped here
    tokens = targets[counted]
    weight = weight.float()  # a no-op in float32; else one float32 copy of the head for all chunks
    bias = bias.float() if bias is not None else None
    track = torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, len(tokens), chunk):
        args = (states[start : start + chunk], weight, bias, tokens[start : start + chunk], softcap)
        if track:
            # No random numbers are drawn in a chunk, so there is no RNG state to keep.
            part = checkpoint(_chunk_logps, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _chunk_logps(*args)
        parts.append(part)
    token_logps = torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(len(labels), dtype=torch.float32, device=hidden.device)
    return sums.index_add(0, rows, token_logps), counted.sum(-1)


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

"""The soft-label DPO loss: TRL's sigmoid loss at p = 1, the formula on random tensors, p = 0.5."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import IGNORE, sequence_logps, soft_dpo_loss


def random_logps(pairs: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(pairs, generator=g, dtype=torch.float64) for _ in range(4)]


def test_soft_loss_matches_the_formula():
    pc, pr, rc, rr = random_logps(16)
    p = torch.rand(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    beta = 0.3
    out = soft_dpo_loss(pc, pr, rc, rr, p, beta)
    d = (pc - rc) - (pr - rr)
    sig = 1 / (1 + torch.exp(-beta * d))
    expected = -(p * torch.log(sig) + (1 - p) * torch.log(1 - sig))
    torch.testing.assert_close(out.per_pair, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    metrics = out.metrics()
    assert metrics["margin"] == pytest.approx(float(d.mean()))
    assert metrics["accuracy"] == pytest.approx(float((d > 0).double().mean()))
    assert metrics["reward_chosen"] == pytest.approx(float(beta * (pc - rc).mean()))
    assert metrics["reward_rejected"] == pytest.approx(float(beta * (pr - rr).mean()))
    assert metrics["kl"] == pytest.approx(float(((pc - rc) + (pr - rr)).mean() / 2))


def test_half_label_has_zero_gradient_at_zero_margin():
    policy_chosen = torch.tensor([-5.0, -12.0], requires_grad=True)
    policy_rejected = torch.tensor([-7.0, -3.0], requires_grad=True)
    # references chosen so that d = 0 for both pairs
    ref_chosen, ref_rejected = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -1.0])
    half = torch.tensor([0.5, 0.5])
    out = soft_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, half, 0.1)
    out.loss.backward()
    assert out.margin.abs().max() == 0
    assert policy_chosen.grad is not None and policy_rejected.grad is not None
    assert policy_chosen.grad.abs().max() == 0 and policy_rejected.grad.abs().max() == 0
    assert float(out.loss.detach()) == pytest.approx(float(torch.log(torch.tensor(2.0))))
    # and a confident label does push: the gradient is beta * (sigmoid(beta d) - p) per pair
    confident = torch.tensor([0.9, 0.9])
    out = soft_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, confident, 0.1)
    policy_chosen.grad = None
    out.loss.backward()
    torch.testing.assert_close(policy_chosen.grad, torch.full((2,), 0.1 * (0.5 - 0.9) / 2))


def test_sequence_logps_count_completion_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE  # prompt of 3 tokens
    labels[1, :2] = IGNORE  # prompt of 2 tokens ...
    labels[1, 5:] = IGNORE  # ... and one padding token
    logps, counts = sequence_logps(logits, labels)
    table = F.log_softmax(logits, -1)
    expected0 = sum(table[0, t - 1, ids[0, t]] for t in range(3, 6))
    expected1 = sum(table[1, t - 1, ids[1, t]] for t in range(2, 5))
    torch.testing.assert_close(logps, torch.stack([expected0, expected1]))
    assert counts.tolist() == [3, 3]


@pytest.mark.integration  # needs the default model's tokenizer, which DPOTrainer requires
def test_hard_label_equals_trl_sigmoid_dpo_loss(default_model, tmp_path):
    """p = 1 reproduces TRL's own sigmoid DPO loss. TRL 1.16 computes it inside
    `DPOTrainer._compute_loss`; we run that method on a real DPOTrainer (a tiny random model,
    precomputed reference log-probs) with a stand-in model whose output carries our per-token
    log-probs, so both losses see the same tensors."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    beta = 0.25
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        report_to=[],
        use_cpu=True,
    )
    data = Dataset.from_list([{"prompt": "Hi", "chosen": " hello", "rejected": " go away"}])
    trl_trainer = DPOTrainer(model=tiny, args=args, train_dataset=data, processing_class=tokenizer)

    pairs, length = 5, 7
    g = torch.Generator().manual_seed(3)
    completion_mask = (torch.rand(2 * pairs, length + 1, generator=g) > 0.4).long()
    completion_mask[:, 0] = 0  # the first token is always prompt
    completion_mask[:, 1] = 1  # every sequence has a completion token
    token_logps = -3 * torch.rand(2 * pairs, length, generator=g) * completion_mask[:, 1:]
    ref = -3 * length * torch.rand(2 * pairs, generator=g)
    outputs = types.SimpleNamespace(
        log_probs=token_logps,
        entropy=torch.zeros(2 * pairs, length),
        mean_logits=torch.zeros(2 * pairs, length),
        is_top1=torch.zeros(2 * pairs, length, dtype=torch.bool),
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, length + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    trl_loss = trl_trainer._compute_loss(lambda **kwargs: outputs, inputs, return_outputs=False)

    logps = token_logps.sum(1)  # our sequence log-probs: completion tokens summed
    ours = soft_dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], torch.ones(pairs), beta)
    torch.testing.assert_close(ours.loss, trl_loss)
    assert 0.1 < float(trl_loss) < 10  # a non-degenerate case
    # and TRL's logged reward metrics agree with ours
    trl_margin = trl_trainer._metrics["train"]["rewards/margins"][-1]
    assert trl_margin == pytest.approx(beta * ours.metrics()["margin"], rel=1e-5)

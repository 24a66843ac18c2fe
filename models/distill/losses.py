"""The distillation losses, on the target positions only (answer or trace tokens):
masked cross-entropy, forward KL to the teacher's cached top-k distribution, and the
blended chain-of-thought loss.

Shapes: student logits (N, V) for the N target tokens of a batch (already gathered, so the
vocabulary projection runs only where a loss needs it); targets (N,); teacher top-k
log-probabilities and token ids (N, k), taken at temperature 1 when the cache was built.

Forward KL with top-k truncation (Busbridge et al. 2025, §4 and App. F: top-k = 128 loses
little): the teacher's top-k probabilities at temperature tau are renormalised over the k
kept tokens,
    p_T(j) = softmax_j(log p_T1(j) / tau)            j over the k kept ids
    KL     = tau^2 * sum_j p_T(j) * (log p_T(j) - log_softmax(z_S / tau)_j)
The student's log-probabilities are over the whole vocabulary, so sum_j p_S(j) <= 1 and the
truncated KL is >= 0, and 0 only when the student puts the teacher's mass on the same k
tokens. tau^2 keeps gradient sizes comparable across temperatures (Hinton et al. 2015).

The `cot` loss is our design (the paper's is not public): over every trace and answer
token, alpha * CE(teacher's generated token) + (1 - alpha) * KL(teacher || student).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of (N, V) logits against (N,) target ids."""
    return F.cross_entropy(logits.float(), targets)


def topk_forward_kl(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    tau: float = 1.0,
) -> torch.Tensor:
    """Mean over tokens of tau^2 * KL(p_T^tau || p_S^tau) on the teacher's top-k support."""
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    teacher = torch.log_softmax(teacher_logprobs.float() / tau, dim=-1)
    student = torch.log_softmax(logits.float() / tau, dim=-1).gather(-1, teacher_ids.long())
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return kl.mean() * tau**2


def cot_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    alpha: float = 0.5,
    tau: float = 1.0,
) -> torch.Tensor:
    """alpha * CE(trace + answer) + (1 - alpha) * KL(teacher || student) over the same tokens."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kl = topk_forward_kl(logits, teacher_logprobs, teacher_ids, tau)
    return alpha * masked_ce(logits, targets) + (1 - alpha) * kl

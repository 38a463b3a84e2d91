"""LoFiT (Yin, Ye, Durrett, NeurIPS 2024): learned per-head scaling and bias offsets on attention-head outputs.

Edit of head h: z ↦ (1 + A_h) ⊙ z + v_h. Stage 1 learns A on every head with an L1 penalty and keeps the K
heads with the largest ‖A_h‖; stage 2 learns the offsets v on those heads only (A reset to 0), as in the paper's
final intervention. The training loop needs a model, so it lives in the harness; this module is pure.

Two objectives: ``lofit`` is the released TruthfulQA recipe (DPO on (best, incorrect) answer pairs, the
``DPO_*`` defaults below, with their sources); ``lofit-sft`` is the LM loss on the correct answers
(``DEFAULT_*``, our own choices).
"""

from __future__ import annotations

import torch
from torch import nn

#: ``lofit-sft`` defaults, chosen here (the paper tunes K and λ per task): 10 % of the heads, L1 weight 1e-3,
#: Adam lr 5e-3, one epoch for head selection and two for the offsets, batch 8.
DEFAULT_K_FRACTION = 0.10
DEFAULT_L1 = 1e-3
DEFAULT_LR = 5e-3
DEFAULT_EPOCHS = (1, 2)
DEFAULT_BATCH = 8


class HeadScaleBias(nn.Module):
    """``a ↦ (1 + A ⊙ m) ⊙ a + v ⊙ m`` for ``a: [..., H, D]``; ``m`` masks the heads that are edited."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.v = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.register_buffer("head_mask", torch.ones(n_heads, 1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        m = self.head_mask.to(a.dtype)
        return (1 + self.A.to(a.dtype) * m) * a + self.v.to(a.dtype) * m


def l1_penalty(modules: dict[int, HeadScaleBias]) -> torch.Tensor:
    return sum(m.A.abs().sum() for m in modules.values())


def select_heads(modules: dict[int, HeadScaleBias], k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest ‖A_h‖ after stage 1."""
    scores = [(float(m.A[h].detach().norm()), layer, h) for layer, m in modules.items() for h in range(m.A.shape[0])]
    if k < 1:
        raise ValueError(f"K must be ≥ 1, got {k}")
    scores.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(layer, h) for _, layer, h in scores[: min(k, len(scores))]]


# ----------------------------------------------------------------------------------------------- DPO recipe
# The released TruthfulQA recipe (github.com/fc2869/lo-fit; trl 0.8.1 and transformers 4.39.2 pinned in its
# requirements.txt). Each value's source:
#: ``lofit_trainer.py``: ``task_map['truthfulqa']['trainer'] = CustomDPOTrainer`` and ``--dpo_beta`` default 0.5.
DPO_BETA = 0.5
#: ``lofit_trainer.py``: ``nn.init.normal_(module, mean=0, std=1e-3)`` for every A (stage 1) and for the selected
#: heads' v (stage 2), "miu = 0, sigma = 1e-3": 1e-3 is the standard deviation, not the variance.
DPO_INIT_STD = 1e-3
#: ``train_script_truthfulqa.sh`` (Llama-2-7B, the uncommented block; 32 layers × 32 heads = 1,024 heads): stage 1
#: saves the top 160 heads by ‖A‖ (``--use_topk_heads 160``), stage 2 tunes v on the top 32 of them
#: (``--use_topk_heads 32``). Absolute counts do not transfer to smaller models, so we keep the shares.
DPO_STAGE1_SAVED_FRACTION = 160 / 1024
DPO_K_FRACTION = 32 / 1024
#: ``train_script_truthfulqa.sh`` (Llama-2-7B): stage 1 ``--lr 5e-3 --l1_lambda 5e-4``, stage 2 ``--lr 1e-2
#: --l1_lambda 0``; both ``--num_epoch 5 --train_batch 8`` (batch = preference pairs).
DPO_LR = (5e-3, 1e-2)
DPO_L1 = 5e-4
DPO_RELEASED_EPOCHS = (5, 5)
DPO_BATCH = 8
#: Our default epochs (stage 1, stage 2), not the released 5 + 5: on smollm2-135m (30 × 9 heads) a DPO step of 8
#: pairs costs ≈ 11 s on 2 CPU cores (≈ 20 s measured with the cores shared), 41 steps an epoch for a fold's ~326
#: training pairs, so 5 + 5 epochs would take ≈ 75 min a fold; 1 + 2 (the ``lofit-sft`` budget) ≈ 24 min.
#: ``-O epochs=5`` restores the released schedule.
DPO_EPOCHS = (1, 2)
#: transformers 4.39.2 ``TrainingArguments`` defaults the released script leaves unset: AdamW (weight decay 0),
#: linear decay of the learning rate to 0 without warm-up, gradient-norm clipping at 1.0.
DPO_MAX_GRAD_NORM = 1.0


def init_normal_(module: HeadScaleBias, which: str, std: float, generator: torch.Generator | None = None) -> None:
    """Draw ``module.A`` or ``module.v`` (``which``) from N(0, std²) on the masked-in heads; zero elsewhere."""
    param = getattr(module, which)
    with torch.no_grad():
        draw = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        param.copy_(draw.to(param) * module.head_mask.to(param))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-sequence sum of the log-probs of the labelled tokens: ``logits [B, T, V]`` predict ``labels [B, T]``
    shifted by one (position t predicts token t + 1); ``ignore_index`` marks tokens that are not scored."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != ignore_index
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = DPO_BETA) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), the sigmoid loss of trl 0.8.1 without label smoothing: the mean over pairs of
    ``−log σ(β [(π_c − π_r) − (ref_c − ref_r)])`` on per-sequence summed answer log-probs."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * logits).mean()

"""LoFiT (Yin et al. 2024, ``baselines/lofit.py``) as harness methods: ``lofit`` (the released TruthfulQA recipe,
DPO) and ``lofit-sft`` (a variant with the LM loss). Both learn per-head scalings, keep the top K heads, then learn
those heads' bias offsets."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from baselines.lofit import DEFAULT_BATCH as LOFIT_BATCH
from baselines.lofit import DEFAULT_EPOCHS as LOFIT_EPOCHS
from baselines.lofit import DEFAULT_K_FRACTION as LOFIT_K_FRACTION
from baselines.lofit import DEFAULT_L1 as LOFIT_L1
from baselines.lofit import DEFAULT_LR as LOFIT_LR
from baselines.lofit import (
    DPO_BATCH,
    DPO_BETA,
    DPO_EPOCHS,
    DPO_INIT_STD,
    DPO_K_FRACTION,
    DPO_L1,
    DPO_LR,
    DPO_MAX_GRAD_NORM,
    DPO_RELEASED_EPOCHS,
    DPO_STAGE1_SAVED_FRACTION,
    HeadScaleBias,
    dpo_loss,
    init_normal_,
    l1_penalty,
    select_heads,
    sequence_logprobs,
)
from bench.interventions import Intervention, method
from bench.methods.context import FitContext
from bench.models import LoadedModel
from bench.options import option
from bench.progress import progress_bar
from bench.scoring import Encoded, encode
from bench.sites import hooked


@dataclass(frozen=True)
class LofitOptions:
    """``lofit``'s options; defaults from the released TruthfulQA recipe (sources in baselines/lofit.py)."""

    k: int | None = option(None, f"heads kept after stage 1 (none: {DPO_K_FRACTION * 1024:g}/1024 of all heads, at least 1)", low=1,
                           label="LoFiT K (heads)", legacy="lofit_k")
    l1: float = option(DPO_L1, "L1 weight on the stage-1 scalings", low=0, label="LoFiT L1 weight", legacy="lofit_l1")
    lr: float | None = option(None, f"learning rate of both stages (none: {DPO_LR[0]:g}, then {DPO_LR[1]:g})", above=0,
                              label="LoFiT learning rate (both stages)", legacy="lofit_lr")
    epochs: int | None = option(None, f"epochs of each stage (none: {DPO_EPOCHS[0]}, then {DPO_EPOCHS[1]}; the released "
                                f"recipe: {DPO_RELEASED_EPOCHS[0]}, then {DPO_RELEASED_EPOCHS[1]})", low=1,
                                label="LoFiT epochs (each stage)", legacy="lofit_epochs")
    beta: float = option(DPO_BETA, "DPO temperature β", above=0, label="LoFiT DPO β", legacy="lofit_beta")


@dataclass(frozen=True)
class LofitSFTOptions:
    """``lofit-sft``'s options (sources in baselines/lofit.py)."""

    k: int | None = option(None, f"heads kept after stage 1 (none: {LOFIT_K_FRACTION:.0%} of all heads, at least 1)", low=1,
                           label="LoFiT K (heads)", legacy="lofit_k")
    l1: float = option(LOFIT_L1, "L1 weight on the stage-1 scalings", low=0, label="LoFiT L1 weight",
                       legacy="lofit_l1")
    lr: float = option(LOFIT_LR, "Adam learning rate of both stages", above=0, label="LoFiT Adam learning rate",
                       legacy="lofit_lr")
    epochs: int | None = option(None, f"epochs of each stage (none: {LOFIT_EPOCHS[0]}, then {LOFIT_EPOCHS[1]})", low=1,
                                label="LoFiT epochs (each stage)", legacy="lofit_epochs")


def _build_lofit(config: dict, tensors: dict[str, torch.Tensor]) -> HeadScaleBias:
    return HeadScaleBias(*tensors["A"].shape)


def _lofit_batches(ctx: FitContext, encoded: list[Encoded], batch: int, gen: torch.Generator):
    """Right-padded (input_ids, attention_mask, labels) batches; labels are -100 except on the answer tokens."""
    tok = ctx.lm.tokenizer
    order = torch.randperm(len(encoded), generator=gen).tolist()
    for start in range(0, len(order), batch):
        yield _padded([encoded[i] for i in order[start : start + batch]], tok.pad_token_id)


def _padded(seqs: list[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; labels are -100 except on the answer tokens."""
    t = max(len(e.ids) for e in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    attn = torch.zeros(len(seqs), t, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    for b, e in enumerate(seqs):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        attn[b, : len(e.ids)] = 1
        labels[b, e.answer] = torch.tensor([e.ids[i] for i in e.answer])
    return ids, attn, labels


def _lofit_train(ctx: FitContext, modules: dict, params: list, epochs: int, l1: float, lr: float, batch: int,
                 rows: list[Encoded], gen: torch.Generator, label: str) -> list[float]:
    lm = ctx.lm
    device = next(lm.model.parameters()).device
    for m in modules.values():
        m.to(device)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    n_batches = epochs * ((len(rows) + batch - 1) // batch)
    with progress_bar(f"LoFiT {label} fold {ctx.fold.fold}", n_batches, " batches") as advance:
        for _ in range(epochs):
            for ids, attn, labels in _lofit_batches(ctx, rows, batch, gen):
                with ExitStack() as stack, torch.enable_grad():
                    for layer, m in modules.items():
                        stack.enter_context(hooked(lm.model, lm.spec, layer, "heads", m, "all"))
                    out = lm.model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
                    loss = out.loss + (l1 * l1_penalty(modules) if l1 else 0.0)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                losses.append(float(out.loss.detach()))
                advance(1, loss=losses[-1])
    return losses


def _stage_epochs(n: int | None, default: tuple[int, int]) -> tuple[int, int]:
    """Epochs of (stage 1, stage 2): option ``epochs`` sets both, else the variant's default."""
    return default if n is None else (n, n)


def _dpo_answer(ctx: FitContext, question: str, answer: str) -> Encoded:
    """``Q: {question} A: {answer}`` + EOS; the scored span is the answer's tokens and the EOS (trl 0.8.1's
    ``DPOTrainer.tokenize_row`` appends EOS to every chosen and rejected answer). The released prompt is
    ``"Q: {question} A:"`` (``utils/dataloaders.py``), which trl joins to the answer with no separator; we keep the
    space, as the released evaluation and our own capture/scoring texts (``qa_text``) do."""
    prompt = f"Q: {question} A: "
    e = encode(ctx.lm, prompt + answer, len(prompt))
    eos = ctx.lm.tokenizer.eos_token_id
    if eos is None or e.ids[-1] == eos:
        return e
    return Encoded([*e.ids, eos], [*e.answer, len(e.ids)])


def _dpo_pairs(ctx: FitContext) -> list[tuple[Encoded, Encoded]]:
    """One (best answer, first incorrect answer) pair per *training* question (never validation or test): the
    released loader (``utils/dataloaders.py``, ``TQA.format_tqa_prompts``) takes the chosen answers from
    ``mc2_targets`` = [Best Answer] + Incorrect Answers and truncates chosen and rejected to equal length, 1."""
    pairs = [(_dpo_answer(ctx, q.question, q.best_answer), _dpo_answer(ctx, q.question, q.incorrect[0]))
             for q in (ctx.questions[i] for i in ctx.fold.train) if q.incorrect]
    if not pairs:
        raise ValueError("LoFiT (DPO) needs training questions with an incorrect answer")
    return pairs


def _answer_logps(lm: LoadedModel, seqs: list[Encoded], device: torch.device) -> torch.Tensor:
    """Summed answer log-probs ``[len(seqs)]`` of right-padded ``seqs`` in one forward pass (hooks as installed)."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, attn, labels = _padded(seqs, pad)
    lo = min(e.answer[0] for e in seqs) - 1  # no logits before the first position that predicts an answer token
    logits = lm.model(input_ids=ids.to(device), attention_mask=attn.to(device),
                      logits_to_keep=torch.arange(lo, ids.shape[1], device=device)).logits
    return sequence_logprobs(logits, labels[:, lo:].to(device))


@torch.no_grad()
def _reference_logps(lm: LoadedModel, pairs: list[tuple[Encoded, Encoded]], batch: int) -> torch.Tensor:
    """``[pairs, 2]`` (chosen, rejected) log-probs of the unintervened model, computed once before training."""
    device = next(lm.model.parameters()).device
    flat = [e for pair in pairs for e in pair]
    out = [_answer_logps(lm, flat[s : s + 2 * batch], device).float().cpu() for s in range(0, len(flat), 2 * batch)]
    return torch.cat(out).view(-1, 2)


def _dpo_step(lm: LoadedModel, pairs: list, ref: torch.Tensor, idx: list[int], beta: float,
              device: torch.device) -> torch.Tensor:
    """The DPO loss of the pairs ``idx``: chosen and rejected answers in one forward pass (as trl concatenates)."""
    logps = _answer_logps(lm, [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], device)
    r = ref[idx].to(device)
    return dpo_loss(logps[: len(idx)], logps[len(idx) :], r[:, 0], r[:, 1], beta)


def _dpo_train(ctx: FitContext, modules: dict, params: list, pairs: list, ref: torch.Tensor, epochs: int,
               l1: float, lr: float, beta: float, gen: torch.Generator, label: str) -> list[list[float]]:
    """One LoFiT stage with the DPO objective (+ L1 on the trained parameters); per-epoch lists of batch losses.

    As the released HF Trainer run: AdamW without weight decay, the learning rate decayed linearly to 0, the
    gradient norm clipped at 1.0, the pairs reshuffled every epoch."""
    lm = ctx.lm
    device = next(lm.model.parameters()).device
    for m in modules.values():
        m.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = epochs * ((len(pairs) + DPO_BATCH - 1) // DPO_BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, (total - step) / total))
    losses: list[list[float]] = []
    with progress_bar(f"LoFiT (DPO) {label} fold {ctx.fold.fold}", total, " batches") as advance, \
            ExitStack() as stack, torch.enable_grad():
        for layer, m in modules.items():
            stack.enter_context(hooked(lm.model, lm.spec, layer, "heads", m, "all"))
        for _ in range(epochs):
            losses.append([])
            order = torch.randperm(len(pairs), generator=gen).tolist()
            for start in range(0, len(order), DPO_BATCH):
                loss = _dpo_step(lm, pairs, ref, order[start : start + DPO_BATCH], beta, device)
                opt.zero_grad(set_to_none=True)
                (loss + l1 * l1_penalty(modules) if l1 else loss).backward()
                torch.nn.utils.clip_grad_norm_(params, DPO_MAX_GRAD_NORM)
                opt.step()
                sched.step()
                losses[-1].append(float(loss.detach()))
                advance(1, loss=losses[-1][-1])
    return losses


def _masked_stage2(chosen: list[tuple[int, int]], heads: int, dim: int) -> dict[int, HeadScaleBias]:
    """Stage-2 modules: one per layer holding a chosen head, masked to its chosen heads, A frozen at 0."""
    stage2 = {}
    for layer in sorted({layer for layer, _ in chosen}):
        m = HeadScaleBias(heads, dim)
        m.head_mask.zero_()
        for lay, h in chosen:
            if lay == layer:
                m.head_mask[h] = 1
        m.A.requires_grad_(False)
        stage2[layer] = m
    return stage2


def _dpo_summary(losses: list[list[float]]) -> dict:
    flat = [x for epoch in losses for x in epoch]
    return {"first_last": [flat[0], flat[-1]], "epoch_means": [sum(e) / len(e) for e in losses]}


@method("lofit", "LoFiT (released TruthfulQA recipe): per-head scaling (head selection) and bias offsets, DPO on "
        "(correct, incorrect) answer pairs", build=_build_lofit, options=LofitOptions, needs_layer=False,
        version=2)  # 2: DPO (1: LM loss, now lofit-sft)
def fit_lofit(ctx: FitContext, options: LofitOptions) -> Intervention:
    """LoFiT, the released TruthfulQA recipe (defaults and sources in ``baselines/lofit.py``): stage 1 learns the
    scalings A ~ N(0, 1e-3²) of every head with DPO + L1 and keeps the K heads with the largest ‖A‖; stage 2 learns
    those heads' offsets v ~ N(0, 1e-3²) with DPO (A = 0). Pairs: (best, first incorrect) answer of each training
    question; reference log-probs from the unintervened model, computed once."""
    spec = ctx.lm.spec
    if ctx.site != "heads":
        raise ValueError("LoFiT edits attention-head outputs: use --site heads")
    heads, dim = spec.site_shape("heads")
    n_all = heads * spec.n_layers
    k = options.k if options.k is not None else max(1, round(DPO_K_FRACTION * n_all))
    l1, beta = options.l1, options.beta
    lrs = DPO_LR if options.lr is None else (options.lr, options.lr)
    epochs = _stage_epochs(options.epochs, DPO_EPOCHS)
    gen = torch.Generator().manual_seed(ctx.seed)
    pairs = _dpo_pairs(ctx)
    ref = _reference_logps(ctx.lm, pairs, DPO_BATCH)
    stage1 = {layer: HeadScaleBias(heads, dim) for layer in range(spec.n_layers)}
    for m in stage1.values():
        init_normal_(m, "A", DPO_INIT_STD, gen)
        m.v.requires_grad_(False)
    loss1 = _dpo_train(ctx, stage1, [m.A for m in stage1.values()], pairs, ref, epochs[0], l1, lrs[0], beta, gen,
                       "stage 1 (scalings, L1)")
    chosen = select_heads(stage1, k)
    stage2 = _masked_stage2(chosen, heads, dim)
    for m in stage2.values():
        init_normal_(m, "v", DPO_INIT_STD, gen)
    loss2 = _dpo_train(ctx, stage2, [m.v for m in stage2.values()], pairs, ref, epochs[1], 0.0, lrs[1], beta, gen,
                       "stage 2 (offsets)")
    for m in stage2.values():
        m.cpu()
    s1, s2 = _dpo_summary(loss1), _dpo_summary(loss2)
    iv = Intervention("lofit", "heads", stage2, {
        "heads": heads, "head_dim": dim, "model": ctx.lm.identity, "data_checksum": ctx.data_checksum,
        "fold": ctx.fold.fold, "objective": "dpo", "beta": beta, "init": f"normal(0, std={DPO_INIT_STD:g})",
        "reference": "unintervened model", "pairs": "best answer vs first incorrect answer, training questions",
        "heads_per_stage": [n_all, len(chosen)], "stage1_saved_heads": round(DPO_STAGE1_SAVED_FRACTION * n_all),
        "k": len(chosen), "l1": l1, "lr": list(lrs), "epochs": list(epochs), "batch_size": DPO_BATCH,
        "released_epochs": list(DPO_RELEASED_EPOCHS),
        "lr_schedule": "linear to 0", "max_grad_norm": DPO_MAX_GRAD_NORM, "heads_chosen": chosen,
        "n_train_pairs": len(pairs), "stage1_loss": s1["first_last"], "stage2_loss": s2["first_last"],
        "stage1_epoch_loss": s1["epoch_means"], "stage2_epoch_loss": s2["epoch_means"]})
    iv.position_policy = "all"
    return iv


@method("lofit-sft", "LoFiT variant: per-head scaling (head selection) and bias offsets, LM loss on correct answers",
        build=_build_lofit, options=LofitSFTOptions, needs_layer=False)
def fit_lofit_sft(ctx: FitContext, options: LofitSFTOptions) -> Intervention:
    """LoFiT, ``lofit-sft`` variant: stage 1 learns per-head scalings (L1) on every head and keeps the top K;
    stage 2 learns the bias offsets of those heads, with the LM loss on the training questions' correct answers
    (``Q: {q}\nA: {a}``); A and v start at 0. The released TruthfulQA recipe is :func:`fit_lofit`."""
    spec = ctx.lm.spec
    if ctx.site != "heads":
        raise ValueError("LoFiT edits attention-head outputs: use --site heads")
    k = options.k if options.k is not None else max(1, round(LOFIT_K_FRACTION * spec.n_layers * spec.n_heads))
    l1, lr = options.l1, options.lr
    epochs1, epochs2 = _stage_epochs(options.epochs, LOFIT_EPOCHS)
    gen = torch.Generator().manual_seed(ctx.seed)
    rows = [encode(ctx.lm, f"Q: {ctx.questions[i].question}\nA: {a}", len(f"Q: {ctx.questions[i].question}\nA: "))
            for i in ctx.fold.train for a in ctx.questions[i].correct]  # tokenised once, reused every epoch
    heads, dim = spec.site_shape("heads")
    stage1 = {layer: HeadScaleBias(heads, dim) for layer in range(spec.n_layers)}
    for m in stage1.values():
        m.v.requires_grad_(False)
    loss1 = _lofit_train(ctx, stage1, [m.A for m in stage1.values()], epochs1, l1, lr, LOFIT_BATCH, rows, gen,
                         "stage 1 (scalings, L1)")
    chosen = select_heads(stage1, k)
    stage2 = _masked_stage2(chosen, heads, dim)
    loss2 = _lofit_train(ctx, stage2, [m.v for m in stage2.values()], epochs2, 0.0, lr, LOFIT_BATCH, rows, gen,
                         "stage 2 (offsets)")
    for m in stage2.values():
        m.cpu()
    iv = Intervention("lofit-sft", "heads", stage2, {
        "heads": heads, "head_dim": dim, "model": ctx.lm.identity, "data_checksum": ctx.data_checksum,
        "objective": "sft", "init": "zeros", "heads_per_stage": [heads * spec.n_layers, len(chosen)],
        "fold": ctx.fold.fold, "k": len(chosen), "l1": l1, "lr": lr, "epochs": [epochs1, epochs2],
        "batch_size": LOFIT_BATCH, "heads_chosen": chosen, "n_train_answers": len(rows),
        "stage1_loss": [loss1[0], loss1[-1]], "stage2_loss": [loss2[0], loss2[-1]]})
    iv.position_policy = "all"
    return iv

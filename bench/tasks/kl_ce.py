"""CE and KL vs the unintervened model (ITI protocol): 100 windows of 128 tokens, the hook on and off in one model.

CE is the intervened model's next-token loss; KL is KL(original ‖ intervened) summed over the vocabulary and
averaged over every predicted position. The edit applies at every position.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.models import LoadedModel

HUB_TEXTS = "stas/openwebtext-10k"
OFFLINE_TEXTS = "nontoxic"  # RealToxicityPrompts prompt texts (sentences from OpenWebText)


def load_texts(source: str | None, data_dir: str | Path | None, seed: int) -> tuple[list[str], str]:
    """Texts to window, shuffled with ``seed``: ``hub`` (openwebtext-10k), a toxicity file name/path, or auto."""
    from bench.data.toxicity import load_prompt_texts

    rng = np.random.RandomState(seed)
    if source in (None, "hub"):
        try:
            from datasets import load_dataset

            ds = load_dataset(HUB_TEXTS, split="train")
            idx = rng.permutation(len(ds))
            return [ds[int(i)]["text"] for i in idx[:1000]], f"hub:{HUB_TEXTS}"
        except Exception as err:  # noqa: BLE001 - offline: fall back (or report when explicitly asked)
            if source == "hub":
                raise RuntimeError(f"could not load {HUB_TEXTS} from the Hub: {err}") from err
    texts, path = load_prompt_texts(source or OFFLINE_TEXTS, data_dir)
    return [texts[i] for i in rng.permutation(len(texts))], path


def make_windows(lm: LoadedModel, texts: list[str], n_windows: int = 100, length: int = 128) -> torch.Tensor:
    """``[n_windows, length]`` token ids: the texts joined by spaces, tokenised once, cut into consecutive
    windows, each starting with BOS when the tokenizer has one."""
    tok = lm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    body = length - len(bos)
    need = n_windows * body
    ids: list[int] = []
    for t in texts:  # grow until there are enough tokens (texts are short sentences)
        ids.extend(tok(" " + t.strip() if ids else t.strip(), add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the text source has {len(ids)} tokens; {n_windows} windows of {length} need {need}")
    return torch.tensor([bos + ids[i * body:(i + 1) * body] for i in range(n_windows)])


@torch.no_grad()
def kl_ce(lm: LoadedModel, windows: torch.Tensor, intervention=None, batch_size: int = 8) -> dict[str, list[float]]:
    """Per-window CE (intervened) and mean per-position KL(original ‖ intervened)."""
    device = next(lm.model.parameters()).device
    ce, kl = [], []
    for s in range(0, len(windows), batch_size):
        ids = windows[s:s + batch_size].to(device)
        base = F.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1)
        on = intervention is not None and bool(intervention.modules)
        with intervention.applied(lm, "all") if on else nullcontext():
            logp = F.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1) if on else base
        target = ids[:, 1:]
        ce.extend((-logp.gather(-1, target[..., None])[..., 0]).mean(1).tolist())
        kl.extend((base.exp() * (base - logp)).sum(-1).clamp_min(0).mean(1).tolist())
    return {"ce": ce, "kl": kl}

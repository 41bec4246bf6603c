"""The next-token loss recovered when an SAE's reconstruction replaces its hook point in the model."""

from __future__ import annotations

import torch


@torch.no_grad()
def splice_metrics(bridge, sae, hook_name: str, token_ids, *, batch_size: int = 16) -> dict:
    """Next-token loss with the SAE's reconstruction spliced in at ``hook_name``.

    Returns the cross-entropy of the clean model, with the hook's output replaced by the SAE's
    reconstruction, and with it zeroed; the fraction of the zero-ablation loss increase that the
    SAE recovers, ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``; and the mean per-token
    KL(clean || spliced). Sequences are right-padded; only real positions count.
    """
    device = next(bridge.parameters()).device
    pad = bridge.tokenizer.pad_token_id if bridge.tokenizer is not None else 0
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0

    def replace(act, hook):
        return sae.decode(sae.encode(act.float())).to(act.dtype)

    def zero(act, hook):
        return torch.zeros_like(act)

    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        width = max(len(t) for t in chunk)
        tokens = torch.full((len(chunk), width), pad if pad is not None else 0, dtype=torch.long)
        for row, seq in enumerate(chunk):
            tokens[row, : len(seq)] = torch.tensor(seq)
        real = (torch.arange(1, width)[None, :] < torch.tensor([len(t) for t in chunk])[:, None]).to(device)
        tokens = tokens.to(device)
        target = tokens[:, 1:]
        logps = {}
        for name, hooks in (("clean", []), ("spliced", [(hook_name, replace)]), ("zero", [(hook_name, zero)])):
            logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
            logps[name] = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logps[name].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            totals[name] += float(nll[real].sum())
        kl = (logps["clean"].exp() * (logps["clean"] - logps["spliced"])).sum(-1)
        totals["kl"] += float(kl[real].sum())
        count += int(real.sum())
    ce = {k: totals[k] / max(count, 1) for k in ("clean", "spliced", "zero")}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / gap if gap > 0 else float("nan"),
        "kl_spliced": totals["kl"] / max(count, 1), "tokens": count,
    }

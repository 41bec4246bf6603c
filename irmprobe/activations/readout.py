"""How readable the tuning's effect on each written token is from the residual stream, block by block.

For every written token ``x_t`` of a set of sequences (positions at or after the prompt) both models are
run teacher-forced with a forward hook after every block, and three numbers are kept per row:

- ``r``: the log-ratio ``log p_tuned(x_t | x<t) - log p_base(x_t | x<t)`` (what every IRM view fits);
- ``direct[l]``: the change of the residual stream after block ``l`` at ``t-1`` (tuned minus base) read through
  the written token's unembedding row, centred over the vocabulary and scaled by the tuned model's final-norm
  weight: the direct path of the change, with no block above ``l`` and no norm's scale. A decision-side view
  that reads features at block ``l`` through their direct effect on the written token (the bilinear view) reads
  this path;
- ``lens[l]``: the logit lens of the log-ratio: each model's own final norm and unembedding applied to its own
  residual stream after block ``l``, the written token's log-probability, tuned minus base. After the last
  block it is ``r`` itself (for models whose logits are the unembedded final norm).

:func:`irmprobe.analysis.depth.depth_profile` turns these into an out-of-fold R^2 per block.
"""

from __future__ import annotations

import numpy as np
import torch

from irmprobe.activations.patching import output_hooks
from irmprobe.models.loading import final_norm
from irmprobe.progress import bar as progress_bar


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def readout_rows(base, tuned, token_ids, prompt_lens, *, batch_size: int = 16, lens: bool = True,
                 pad_id: int = 0) -> dict:
    """Per written token of ``token_ids`` (sequences; ``prompt_lens[i]`` prompt tokens each): ``r``, ``direct``
    and ``lens`` (see the module docstring), with each row's ``sequence`` and ``position``.

    Returns:
        ``{"r": [n], "direct": [n, L], "lens": [n, L] or None, "sequence": [n], "position": [n]}`` as NumPy
        arrays (float64 for the values).

    Raises:
        ValueError: no sequence has a written token, the models differ in depth or width, or ``lens`` is asked
            of a model with no final norm this package knows.
    """
    n_layers = int(tuned.config.num_hidden_layers)
    if int(base.config.num_hidden_layers) != n_layers or base.config.hidden_size != tuned.config.hidden_size:
        raise ValueError("base and tuned models must have the same number of blocks and width")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    jobs = [i for i, ids in enumerate(token_ids) if len(ids) > int(prompt_lens[i]) >= 1]
    if not jobs:
        raise ValueError("readout_rows needs sequences with at least one prompt token and one written token")
    norms = {"base": final_norm(base), "tuned": final_norm(tuned)}
    if lens and any(n is None for n in norms.values()):
        raise ValueError("the logit lens needs the models' final norm, and this architecture's is not known: "
                         "pass lens=False")
    unembed = tuned.get_output_embeddings().weight.detach().float()
    gamma = getattr(norms["tuned"], "weight", None)
    # The direct path: the written token's centred unembedding row (a shift all logits share leaves
    # log-probabilities unchanged), scaled by the final norm's weight as in the bilinear view.
    readout = (unembed - unembed.mean(0)) * (1.0 if gamma is None else gamma.detach().float())
    points = [("resid_post", b) for b in range(n_layers)]
    out = {"r": [], "direct": [], "lens": [], "sequence": [], "position": []}
    for start in progress_bar(range(0, len(jobs), batch_size), desc="readout by block", leave=False):
        idx = jobs[start: start + batch_size]
        width = max(len(token_ids[i]) for i in idx)
        tokens = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # right padding: positions are the default ones
            tokens[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
            mask[row, : len(token_ids[i])] = 1
        # Rows: (batch row, t-1) for every written token t.
        b_rows, t_prev = [], []
        for row, i in enumerate(idx):
            for t in range(int(prompt_lens[i]), len(token_ids[i])):
                b_rows.append(row)
                t_prev.append(t - 1)
                out["sequence"].append(i)
                out["position"].append(t)
        b_rows, t_prev = torch.tensor(b_rows), torch.tensor(t_prev)
        written = tokens[b_rows, t_prev + 1]
        states, logp = {}, {}
        for name, model in (("base", base), ("tuned", tuned)):
            store = {}
            with output_hooks(model, points, lambda p, a: store.__setitem__(p[1], a)):
                logits = model(input_ids=tokens.to(_device(model)), attention_mask=mask.to(_device(model))).logits
            logp[name] = logits[b_rows, t_prev].float().log_softmax(-1).gather(
                -1, written.to(logits.device)[:, None])[:, 0].cpu().double()
            states[name] = [store[b][b_rows, t_prev].float() for b in range(n_layers)]
        out["r"].append(logp["tuned"] - logp["base"])
        w = readout[written]
        out["direct"].append(torch.stack([((states["tuned"][b] - states["base"][b]).cpu() * w).sum(-1)
                                          for b in range(n_layers)], 1).double())
        if lens:
            columns = []
            for b in range(n_layers):
                value = 0.0
                for sign, name, model in ((1.0, "tuned", tuned), (-1.0, "base", base)):
                    head = model.get_output_embeddings()
                    h = states[name][b].to(head.weight.dtype)
                    lp = head(norms[name](h)).float().log_softmax(-1)
                    value = value + sign * lp.gather(-1, written.to(lp.device)[:, None])[:, 0].cpu().double()
                columns.append(value)
            out["lens"].append(torch.stack(columns, 1))
    return {"r": torch.cat(out["r"]).numpy(), "direct": torch.cat(out["direct"]).numpy(),
            "lens": torch.cat(out["lens"]).numpy() if lens else None,
            "sequence": np.asarray(out["sequence"], dtype=np.int64),
            "position": np.asarray(out["position"], dtype=np.int64)}

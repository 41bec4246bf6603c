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

from irmprobe.activations.capture import right_padded
from irmprobe.activations.patching import output_hooks
from irmprobe.models.loading import direct_readout, final_norm, readout
from irmprobe.models.placement import input_device, module_device
from irmprobe.progress import bar as progress_bar


def _lens_logp(model, norm, states: torch.Tensor, written: torch.Tensor, chunk: int) -> torch.Tensor:
    """The written token's log-probability under ``model``'s own final norm and unembedding applied to ``states``
    (float64, CPU), ``chunk`` rows at a time so that at most ``chunk x vocab`` logits exist at once."""
    head = model.get_output_embeddings()
    out = []
    for start in range(0, len(states), chunk):
        # Each module on its own device (a model split over devices may keep its norm and head apart).
        h = states[start: start + chunk].to(device=module_device(norm), dtype=head.weight.dtype)
        logits = head(norm(h).to(module_device(head))).float()
        pick = written[start: start + chunk].to(logits.device)[:, None]
        out.append((logits.gather(-1, pick)[:, 0] - logits.logsumexp(-1)).cpu().double())
    return torch.cat(out)


@torch.no_grad()
def readout_rows(base, tuned, token_ids, prompt_lens, *, batch_size: int = 16, lens: bool = True,
                 pad_id: int = 0, lens_chunk: int = 1024) -> dict:
    """Per written token of ``token_ids`` (sequences; ``prompt_lens[i]`` prompt tokens each): ``r``, ``direct``
    and ``lens`` (see the module docstring), with each row's ``sequence`` and ``position``.

    Returns:
        ``{"r": [n], "direct": [n, L], "lens": [n, L] or None, "sequence": [n], "position": [n]}`` as NumPy
        arrays (float64 for the values).

    The direct path reads both models' change through the *tuned* model's unembedding and final-norm weight
    (a ``(1 + w)`` norm, as Gemma's, is read as ``w``), so what the tuning changed in those read-out weights
    themselves is not in it: even after the last block it falls short of ``r``, which the lens reaches.

    Raises:
        ValueError: no sequence has a written token, the models differ in depth or width, or ``lens`` is asked
            of a model with no final norm this package knows.
    """
    n_layers = int(tuned.config.num_hidden_layers)
    if int(base.config.num_hidden_layers) != n_layers or base.config.hidden_size != tuned.config.hidden_size:
        raise ValueError("base and tuned models must have the same number of blocks and width")
    if batch_size < 1 or lens_chunk < 1:
        raise ValueError(f"batch_size and lens_chunk must be at least 1, got {batch_size} and {lens_chunk}")
    jobs = [i for i, ids in enumerate(token_ids) if len(ids) > int(prompt_lens[i]) >= 1]
    if not jobs:
        raise ValueError("readout_rows needs sequences with at least one prompt token and one written token")
    norms = {"base": final_norm(base), "tuned": final_norm(tuned)}
    if lens and any(n is None for n in norms.values()):
        raise ValueError("the logit lens needs the models' final norm, and this architecture's is not known: "
                         "pass lens=False (in a run: depth.lens: false)")
    unembed, gamma = readout(tuned)
    direct_rows = torch.from_numpy(direct_readout(unembed, gamma))  # as the bilinear view reads a direction
    points = [("resid_post", b) for b in range(n_layers)]
    lengths = np.array([len(ids) for ids in token_ids])
    out = {"r": [], "direct": [], "lens": [], "sequence": [], "position": []}
    for start in progress_bar(range(0, len(jobs), batch_size), desc="readout by block", leave=False):
        idx = jobs[start: start + batch_size]
        tokens = right_padded(token_ids, np.asarray(idx), lengths, pad_id)  # no mask needed: see right_padded
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

            def keep(point, act, store=store):  # only the decision rows, so memory grows with them, not the batch
                store[point[1]] = act[b_rows.to(act.device), t_prev.to(act.device)].float()

            with output_hooks(model, points, keep):
                device = input_device(model)
                logits = model(input_ids=tokens.to(device)).logits
            rows_at = (b_rows.to(logits.device), t_prev.to(logits.device))
            logp[name] = logits[rows_at].float().log_softmax(-1).gather(
                -1, written.to(logits.device)[:, None])[:, 0].cpu().double()
            states[name] = [store[b] for b in range(n_layers)]
        out["r"].append(logp["tuned"] - logp["base"])
        w = direct_rows[written]
        out["direct"].append(torch.stack([((states["tuned"][b].cpu() - states["base"][b].cpu()) * w).sum(-1)
                                          for b in range(n_layers)], 1).double())
        if lens:
            out["lens"].append(torch.stack([sum(sign * _lens_logp(model, norms[name], states[name][b], written,
                                                                   lens_chunk)
                                                for sign, name, model in ((1.0, "tuned", tuned), (-1.0, "base", base)))
                                            for b in range(n_layers)], 1))
    return {"r": torch.cat(out["r"]).numpy(), "direct": torch.cat(out["direct"]).numpy(),
            "lens": torch.cat(out["lens"]).numpy() if lens else None,
            "sequence": np.asarray(out["sequence"], dtype=np.int64),
            "position": np.asarray(out["position"], dtype=np.int64)}

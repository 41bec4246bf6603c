#!/usr/bin/env python
"""Why a decision-side view fits the log-ratio or not: out-of-fold R^2 of r_t from the t-1 state, several ways.

On a run's cached capture and SAEs (the pipeline's prompt folds; prompt rows never scored), cross-fits r_t on:

- ``state``: the tuned SAE features at t-1 (``sae_irm_decision``);
- ``bilinear``: each feature at t-1 times its decoder direction's direct effect on the written token's logit
  (``sae_irm_bilinear``);
- ``bilinear diff``: the same for the change of each feature (tuned minus base activation, one dictionary);
- ``direct change``: per hook point, the change of the whole activation (tuned minus base) read through the
  written token's centred unembedding row, one column per hook point: the direct path with no dictionary;
- with ``--change`` (runs the attribute stage with ``attribute.dictionary=change``, cached): ``bilinear change
  dictionary``, the bilinear view on the features of the dictionaries of the change (each feature's value on the
  change minus its value on no change, times its direct effect on the written token), and ``change dictionary
  sum``, their decoded sum's direct path, one column per hook point (the direct change less the dictionary's
  error).

If even the direct change explains little, the hook points' direct path does not carry r_t and no dictionary at
them can (compare the attribute stage's bound). Reuses the stage cache (``IRMPROBE_CACHE``): run the pipeline up to
``saes`` first.

    python benchmarks/decision_views.py
    python benchmarks/decision_views.py --set capture.hook=hook_resid_post
    python benchmarks/decision_views.py --change --set capture.hook=hook_resid_post \\
        --set capture.patching_kind=resid_post
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.activations.patching import decision_rows  # noqa: E402
from irmprobe.activations.samples import in_prompt  # noqa: E402
from irmprobe.analysis.views import bilinear_inputs, prompt_folds  # noqa: E402
from irmprobe.api import run  # noqa: E402
from irmprobe.config import RunConfig  # noqa: E402
from irmprobe.irm.crossfit import cross_fit_irm  # noqa: E402
from irmprobe.models.loading import direct_readout, readout  # noqa: E402
from irmprobe.saes.evaluate import decoder_directions, encode  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "default.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--change", action="store_true", help="also the views on the dictionaries of the change")
    args = ap.parse_args(argv)
    data = RunConfig.from_yaml(args.config).to_dict()
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        data[section][name] = value
    if args.change:
        data["attribute"]["dictionary"] = "change"
    cfg = RunConfig.from_dict(data)
    result = run(cfg, until="attribute" if args.change else "saes", echo=lambda line: print(line, file=sys.stderr))
    runner = result.context.resources["runner"]
    cap, samples, saes = runner.result("capture"), runner.result("samples"), runner.result("saes").saes
    pair = result.context.pair_of(runner.result("organism"))
    layers = cap.layers
    y = cap.log_ratio.astype(np.float64)
    units, folds = prompt_folds(cap, samples, cfg.seed)
    rows, prev = decision_rows(cap.seq_index, cap.position)
    scored = np.flatnonzero(~in_prompt(samples, cap.seq_index, cap.position)[rows])
    local = tuple(np.flatnonzero(np.isin(rows, f)) for f in folds)
    unembed, gamma = readout(pair.tuned)
    written = cap.token_ids[rows]

    def r2(name, X):
        f = cross_fit_irm(name, X, y[rows], units[rows], folds=local, score_rows=scored,
                          alphas=(0.1, 1.0, 10.0, 100.0, 1000.0))
        print(f"| {cap.hook} at {','.join(map(str, layers))} | {name} | {f.test_r2:+.3f} | {f.alpha:g} |")

    F_t = sp.hstack([encode(saes["tuned", layer], cap.acts[f"tuned.{layer}"]) for layer in layers]).tocsr()
    F_b = sp.hstack([encode(saes["tuned", layer], cap.acts[f"base.{layer}"]) for layer in layers]).tocsr()
    D = np.vstack([decoder_directions(saes["tuned", layer]) for layer in layers])
    print("| hook points | view | out-of-fold R2 | ridge alpha |\n| --- | --- | --- | --- |")
    r2("state", F_t[prev])
    Z = bilinear_inputs(F_t[prev], written, D, unembed, gamma)
    r2("bilinear", Z)
    r2("bilinear diff", Z - bilinear_inputs(F_b[prev], written, D, unembed, gamma))
    W = direct_readout(unembed, gamma)
    direct = np.stack([np.einsum("nd,nd->n", W[written], (cap.acts[f"tuned.{layer}"] - cap.acts[f"base.{layer}"])[prev])
                       for layer in layers], 1)
    r2("direct change", direct)
    if args.change:
        from irmprobe.saes.evaluate import zero_input_features
        from irmprobe.validation.ablation import load_change_dictionaries

        change = load_change_dictionaries(runner.result("attribute"), device="cpu")
        if set(change) != set(layers):
            raise ValueError(f"--change needs the attribute stage's dictionaries of the change at blocks {layers}; it "
                             f"has {sorted(change)} ({runner.result('attribute').get('skipped', 'other blocks')})")
        C, sums = [], []
        for layer in layers:
            delta = (cap.acts[f"tuned.{layer}"] - cap.acts[f"base.{layer}"])[prev]
            f = encode(change[layer], delta).toarray() - zero_input_features(change[layer])[None, :]
            C.append(bilinear_inputs(f, written, decoder_directions(change[layer]), unembed, gamma))
            sums.append(C[-1].sum(1))
        r2("bilinear change dictionary", np.hstack(C))
        r2("change dictionary sum", np.stack(sums, 1))
    print(f"\ncorrelation of the summed direct change with r_t (scored rows): "
          f"{np.corrcoef(direct.sum(1)[scored], y[rows][scored])[0, 1]:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

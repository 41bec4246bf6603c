#!/usr/bin/env python
"""SAE training throughput: irmprobe's ``train_sae`` against SAELens's own training runner.

Both train the same SAE (architecture, d_sae, batch size, learning rate, number of tokens) on the
same activations in this process. irmprobe feeds SAELens's ``SAETrainer`` shuffled batches
straight from the activation store's arrays; the baseline is SAELens's
``LanguageModelSAETrainingRunner`` reading the same activations from a cached-activations dataset
in its own on-disk format (``use_cached_activations=True``), so it never runs the LM either.
Prints tokens/s of each and the ratio irmprobe / SAELens (target >= 1.0).

    python benchmarks/sae_training.py                                # planted activations, d=576
    python benchmarks/sae_training.py --store DIR --key tuned.9      # a captured paired store
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irmprobe.activations.store import load_store  # noqa: E402
from irmprobe.config import SAEConfig  # noqa: E402
from irmprobe.saes.evaluate import evaluate_sae  # noqa: E402
from irmprobe.saes.train import train_sae  # noqa: E402

CONTEXT = 128  # rows per cached-dataset example (SAELens stores activations per context)


def _planted(n: int, d: int, seed: int) -> np.ndarray:
    """Activations built from a sparse code over a random dictionary, so an SAE has real work."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((4 * d, d)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    code = rng.exponential(1.0, (n, 4 * d)).astype(np.float32) * (rng.random((n, 4 * d)) < 8 / (4 * d))
    return code @ dictionary + 0.01 * rng.standard_normal((n, d)).astype(np.float32)


def _sae_lens_runner(acts: np.ndarray, config: SAEConfig, hook: str, tmp: Path, seed: int):
    """SAELens's runner on ``acts`` saved as its cached-activations dataset."""
    import datasets
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
    )
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    n_ctx = len(acts) // CONTEXT
    data = acts[: n_ctx * CONTEXT].reshape(n_ctx, CONTEXT, -1)
    path = tmp / "cached_activations"
    features = datasets.Features({hook: datasets.Array2D(shape=(CONTEXT, acts.shape[1]), dtype="float32")})
    datasets.Dataset.from_dict({hook: data}, features=features).save_to_disk(str(path))
    d_in = acts.shape[1]
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d_in, d_sae=config.expansion * d_in,
                                      l1_coefficient=config.l1_coefficient,
                                      normalize_activations="expected_average_only_in"),
        hook_name=hook,
        use_cached_activations=True,
        cached_activations_path=str(path),
        is_dataset_tokenized=True,
        context_size=CONTEXT,
        store_batch_size_prompts=16,
        n_batches_in_buffer=16,
        training_tokens=config.training_samples,
        train_batch_size_tokens=config.batch_size,
        lr=config.lr,
        lr_end=config.lr,
        n_batches_for_norm_estimate=max(1, min(50, len(acts) // config.batch_size)),
        dead_feature_window=max(50, config.training_samples // config.batch_size // 4),
        feature_sampling_window=max(50, config.training_samples // config.batch_size // 2),
        n_eval_batches=0,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None,
        checkpoint_path=str(tmp / "checkpoints"),
        seed=seed,
        device="cpu",
        verbose=False,
    )
    # The runner wants a model and a token dataset even when it reads cached activations; neither
    # is used for training (the evaluator is off with n_eval_batches=0).
    shell = HookedTransformerConfig(n_layers=1, d_model=d_in, n_ctx=CONTEXT, d_head=d_in // 8, n_heads=8,
                                    d_vocab=16, act_fn="relu", d_mlp=4 * d_in)
    stub_lm = HookedTransformer(shell)  # never run
    tokens = datasets.Dataset.from_dict({"input_ids": [[1] * CONTEXT]})
    runner = LanguageModelSAETrainingRunner(cfg, override_model=stub_lm, override_dataset=tokens)
    start = time.perf_counter()
    sae = runner.run()
    return sae, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a paired activation store (default: planted activations)")
    parser.add_argument("--key", default="tuned.9", help="activation array in the store, MODEL.LAYER")
    parser.add_argument("--rows", type=int, default=100_000, help="planted activations to make")
    parser.add_argument("--d-model", type=int, default=576, help="width of the planted activations")
    parser.add_argument("--tokens", type=int, default=150_000, help="training tokens for each trainer")
    parser.add_argument("--batch-size", type=int, default=SAEConfig.batch_size, help="activations per optimiser step")
    parser.add_argument("--expansion", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each trainer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    # The runner warns that its stub model is deprecated and that it cycles the cached dataset.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="sae_lens")
    torch.set_num_threads(torch.get_num_threads())

    if args.store:
        acts = load_store(args.store).acts[args.key].astype(np.float32)
        source = f"{args.store} [{args.key}]"
    else:
        acts = _planted(args.rows, args.d_model, args.seed)
        source = f"planted sparse code, d_model {args.d_model}"
    hook = "blocks.0.hook_mlp_out"
    config = SAEConfig(expansion=args.expansion, training_samples=args.tokens, batch_size=args.batch_size)
    held_out = acts[-min(10_000, len(acts) // 10):]
    print(f"activations      {len(acts)} x {acts.shape[1]} ({source})")
    print(f"SAE              standard, d_sae {config.expansion * acts.shape[1]}, batch {config.batch_size}, "
          f"{config.training_samples} tokens, {torch.get_num_threads()} threads")

    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            # Alternate which trainer goes first so warm-up and drift do not favour one.
            for which in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                if which == "ours":
                    start = time.perf_counter()
                    sae = train_sae(acts, config, seed=args.seed, metadata={"hook_name": hook})
                    ours.append(time.perf_counter() - start)
                    ev_ours = evaluate_sae(sae, held_out).explained_variance
                else:
                    run_dir = Path(tmp) / f"r{r}"
                    run_dir.mkdir()
                    sae_lens_sae, seconds = _sae_lens_runner(acts, config, hook, run_dir, args.seed)
                    theirs.append(seconds)
                    ev_theirs = evaluate_sae(sae_lens_sae, held_out).explained_variance

    ours_tps = config.training_samples / min(ours)
    theirs_tps = config.training_samples / min(theirs)
    print(f"irmprobe         {ours_tps:10.0f} tokens/s  (best of {args.repeats}; expl. var. {ev_ours:.3f})")
    print(f"SAELens runner   {theirs_tps:10.0f} tokens/s  (best of {args.repeats}; expl. var. {ev_theirs:.3f})")
    print(f"ratio            {ours_tps / theirs_tps:.3f}  (irmprobe / SAELens runner; target >= 1.0)")


if __name__ == "__main__":
    main()

"""Do the model's numbers depend on what else the machine is doing?

Runs one fixed computation of the kind the samplers and the ablation run (a batched forward of the model with
its KV cache, then ``--steps`` greedy decode steps, each step's log-softmax in float64) and hashes every
number it produces. The same computation is repeated:

- on a quiet machine (the reference; the repeats must agree with each other);
- while ``--load`` other processes multiply float32 matrices with ``--hog-threads`` threads each, as a second
  irmprobe run or a test suite beside it would;
- at 1 thread instead of this process's default (a control that differs in one known thing: the reduction
  order of the products, so its hash is expected to differ and shows that the hash would see a change).

Prints one row per run with its hash and whether it equals the quiet one; exits 1 where the quiet repeats
disagree or a busy run differs from them. The figures in docs/validation.md
("Reproducibility on a busy machine") come from ``python benchmarks/determinism_under_load.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from irmprobe.activations.patching import _cache_key  # noqa: E402
from irmprobe.models.loading import DEFAULT_BASE, load_model  # noqa: E402

HOG = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(700, 900), torch.randn(900, 1100)
(a @ b).sum()
print("ready", flush=True)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    (a @ b).sum()
"""


def fingerprint(model, rows: int, prompt_len: int, steps: int, seed: int) -> str:
    """A hash of every logit row the fixed computation produces: the prefill's last position, then each of
    ``steps`` greedy decode steps."""
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (rows, prompt_len), generator=torch.Generator().manual_seed(seed))
    digest, key = hashlib.sha256(), _cache_key(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for step in range(steps + 1):
            last = out.logits[:, -1]
            digest.update(torch.log_softmax(last.double(), -1).numpy().tobytes())
            if step < steps:  # the KV cache under the name this transformers version uses, as the samplers do
                out = model(input_ids=last.argmax(-1, keepdim=True), use_cache=True, **{key: out[key]})
    return digest.hexdigest()[:16]


def start_load(n: int, threads: int, seconds: float) -> list[subprocess.Popen]:
    """``n`` processes multiplying matrices with ``threads`` threads each; returns once each has multiplied once
    (ValueError if one exits first). The caller stops them (:func:`stop_load`)."""
    hogs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            hogs.append(subprocess.Popen([sys.executable, "-c", HOG, str(threads), str(seconds)],
                                         stdout=subprocess.PIPE, text=True))
        for hog in hogs:
            if hog.stdout.readline().strip() != "ready":
                raise ValueError(f"a loading process exited before it multiplied (exit code {hog.wait()})")
    except BaseException:
        stop_load(hogs)
        raise
    return hogs


def stop_load(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
        hog.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_BASE, help="model spec (default: the embedded base model)")
    ap.add_argument("--rows", type=int, default=150, help="sequences per batch (the ablation batches ~150 rows)")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=15, help="decode steps after the prefill")
    ap.add_argument("--repeats", type=int, default=3, help="runs per condition")
    ap.add_argument("--load", type=int, default=2, help="processes loading the machine in the busy condition")
    ap.add_argument("--hog-threads", type=int, default=2, help="threads each loading process uses")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("rows", "prompt_len", "repeats", "load", "hog_threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.steps < 0:
        ap.error(f"--steps must be 0 or more, got {args.steps}")

    model, _ = load_model(args.model, device="cpu")
    model.eval()
    threads = torch.get_num_threads()

    def run(condition: str) -> tuple[str, str, float]:
        started = time.perf_counter()
        digest = fingerprint(model, args.rows, args.prompt_len, args.steps, args.seed)
        return condition, digest, time.perf_counter() - started

    rows = [run(f"quiet, {threads} threads") for _ in range(args.repeats)]
    # The loading processes live at most an hour, should this process be killed before it stops them.
    hogs = start_load(args.load, args.hog_threads, 3600)
    try:
        rows += [run(f"{args.load} x {args.hog_threads}-thread load, {threads} threads")
                 for _ in range(args.repeats)]
        if any(hog.poll() is not None for hog in hogs):
            raise SystemExit("a loading process stopped during the busy runs: they were not all busy; rerun")
    finally:
        stop_load(hogs)
    if threads > 1:  # the control: the same computation in another reduction order
        torch.set_num_threads(1)
        rows.append(run("quiet, 1 thread (control: another reduction order)"))
        torch.set_num_threads(threads)
    else:
        print("this process already runs 1 thread: no control of another thread count")

    reference = rows[0][1]
    print(f"{args.model}: prefill of {args.rows} x {args.prompt_len} tokens, then {args.steps} decode steps; "
          f"the hash covers every step's float64 log-softmax")
    print(f"{'condition':<50} {'seconds':>8}  {'hash':<16}  same as quiet")
    for condition, digest, seconds in rows:
        print(f"{condition:<50} {seconds:>8.1f}  {digest:<16}  {'yes' if digest == reference else 'NO'}")
    busy = [d for c, d, _ in rows if "load" in c]
    quiet = [d for c, d, _ in rows if c.startswith("quiet, ") and "control" not in c]
    control = [d for c, d, _ in rows if "control" in c]
    print(f"quiet repeats agree: {len(set(quiet)) == 1}; busy runs equal the quiet one: "
          f"{all(d == reference for d in busy)}"
          + (f"; the 1-thread control differs: {control[0] != reference}" if control else ""))
    return 0 if len(set(quiet)) == 1 and all(d == reference for d in busy) else 1


if __name__ == "__main__":
    raise SystemExit(main())

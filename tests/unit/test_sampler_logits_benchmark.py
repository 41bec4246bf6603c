"""benchmarks/sampler_logits.py: the sampler with the last position's logits only samples what it sampled with
every position's, and the script says so (exit 0) on a tiny model."""

from __future__ import annotations

from tests.unit.benchmark_module import load_benchmark


def test_the_benchmark_finds_identical_samples_both_ways(tiny_llama_dir, capsys):
    bench = load_benchmark("sampler_logits")
    code = bench.main(["--base", str(tiny_llama_dir), "--prompts", "3", "--conditions", "2", "--repeats", "1",
                       "--max-new-tokens", "4", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "identical samples: True" in out and "time ratio (last only / baseline):" in out

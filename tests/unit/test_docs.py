"""The docs stay true to the code: the config reference is regenerated, internal links resolve."""

import re
from pathlib import Path

from irmprobe.config import RunConfig, config_reference

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    assert (ROOT / "docs" / "configuration.md").read_text() == config_reference(), (
        "docs/configuration.md is stale: regenerate it with "
        "python -c \"from irmprobe.config import config_reference; "
        "open('docs/configuration.md','w').write(config_reference())\""
    )


def test_internal_markdown_links_resolve():
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.name} links to missing {target}"


def test_default_yaml_parses_and_matches_documented_defaults():
    cfg = RunConfig.from_yaml(ROOT / "configs" / "default.yaml")
    assert cfg.pair.base == "smollm2-135m-instruct" and cfg.pair.tuned is None
    assert cfg.organism == RunConfig().organism  # the Python API default is the demo's organism
    assert "make demo" in (ROOT / "README.md").read_text() and "make test" in (ROOT / "README.md").read_text()


def test_public_names_resolve():
    import irmprobe

    for name in irmprobe.__all__:
        assert getattr(irmprobe, name) is not None, name


def test_every_script_has_help():
    import subprocess
    import sys

    for script in sorted((ROOT / "scripts").glob("*.py")):
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (script.name, out.stderr[-500:])


def test_every_shipped_config_parses():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        RunConfig.from_yaml(path)  # raises ValueError naming the field if any is wrong
    assert RunConfig.from_yaml(ROOT / "configs" / "gpt2-imdb.yaml").reward.kind == "classifier"
    assert RunConfig.from_yaml(ROOT / "configs" / "pythia70m-vader.yaml").capture.top_k_layers == 5


def test_metrics_json_schema_is_current():
    import json

    from irmprobe.results import json_schema

    assert json.loads((ROOT / "docs" / "metrics.schema.json").read_text()) == json_schema(), (
        "docs/metrics.schema.json is stale: regenerate it with python -c \"import json; from irmprobe.results "
        "import json_schema; open('docs/metrics.schema.json','w').write(json.dumps(json_schema(), indent=2)+'\\n')\"")

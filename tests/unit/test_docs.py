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


# ---------------------------------------------------------------------------------------------------------------
# Names a page gives: repo paths, dotted irmprobe names and config fields must exist in the code.

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"(?<![\w./$<>-])((?:irmprobe|tests|scripts|benchmarks|configs|docs)/[\w./*<>{}-]*)")
_DOTTED = re.compile(r"(?<![\w./-])(irmprobe(?:\.[A-Za-z_]\w*)+)")
_FROM_IMPORT = re.compile(r"^\s*from (irmprobe[\w.]*) import \(?([\w, ]+)\)?", re.MULTILINE)
_SET = re.compile(r"--set[ =]+['\"]?(?!section\.field=)([A-Za-z_]\w*)\.(\w+)=")
_FILE_SUFFIXES = {"log", "py", "md", "json", "yaml", "txt", "html"}
"""A dotted name whose last part is one of these names a file (``irmprobe.log``, ``organism.json``), not a Python
object or a config field."""


def _sections() -> dict[str, set[str]]:
    """RunConfig section -> its field names (``pair`` -> {``base``, ``tuned``, ...})."""
    import dataclasses

    return {f.name: {g.name for g in dataclasses.fields(f.default_factory)}
            for f in dataclasses.fields(RunConfig) if f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(f.default_factory)}


def _split(text: str) -> tuple[str, list[str]]:
    """The page without its fenced code blocks, and those blocks."""
    return _FENCE.sub("", text), _FENCE.findall(text)


def repo_paths(text: str) -> set[str]:
    """Repository paths a page names (``irmprobe/activations/capture.py``, ``tests/unit/test_x.py``, a folder);
    glob patterns and placeholders (``*``, ``<...>``, ``{...}``) are not names."""
    out = set()
    for path in _PATH.findall(text):
        path = path.rstrip(".")
        if not any(c in path for c in "*<>{}"):
            out.add(path)
    return out


def dotted_names(text: str) -> set[str]:
    """``irmprobe.a.b[.c]`` names a page gives, and ``irmprobe.a.X`` for each ``from irmprobe.a import X``."""
    out = {n for n in _DOTTED.findall(text) if n.rsplit(".", 1)[1] not in _FILE_SUFFIXES}
    for module, names in _FROM_IMPORT.findall(text):
        out |= {f"{module}.{n.strip()}" for n in names.split(",") if n.strip()}
    return out


def config_names(text: str, sections: dict[str, set[str]]) -> set[tuple[str, str]]:
    """``(section, field)`` for every ``section.field`` in an inline code span whose section is a RunConfig
    section (``compare.n_controls``, ``config.irm.alphas[1]``, ``pair.base/tuned/null`` gives three), and for
    every ``--set section.field=value`` anywhere, code blocks included (the placeholder ``section.field`` aside).
    A Python variable named like a section (``capture.acts``) reads as a config name: name it otherwise."""
    prose, blocks = _split(text)
    out = set()
    for span in _INLINE.findall(prose):
        for m in re.finditer(r"(?<![\w.$/-])(?:config\.)?([A-Za-z_]\w*)\.(\w+)((?:/\w+)*)", span):
            if m.group(1) in sections and m.group(2) not in _FILE_SUFFIXES:
                out |= {(m.group(1), f) for f in [m.group(2), *filter(None, m.group(3).split("/"))]}
    for chunk in [prose, *blocks]:
        out |= set(_SET.findall(chunk))
    return out


def resolves(name: str) -> bool:
    """Import the longest module prefix of ``name``, then getattr the rest."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name) and exc.name.startswith("irmprobe"):
                continue  # this prefix is no module: try a shorter one
            raise
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_repo_path_a_page_names_exists():
    missing = [f"{md.name}: {p}" for md in PAGES for p in sorted(repo_paths(md.read_text()))
               if not (ROOT / p).exists()]
    assert missing == [], missing


def test_every_dotted_irmprobe_name_a_page_gives_resolves():
    broken = [f"{md.name}: {n}" for md in PAGES for n in sorted(dotted_names(md.read_text())) if not resolves(n)]
    assert broken == [], broken


def test_every_config_field_a_page_names_is_a_field_of_its_section():
    sections = _sections()
    unknown = [f"{md.name}: {s}.{f}" for md in PAGES for s, f in sorted(config_names(md.read_text(), sections))
               if f not in sections.get(s, ())]
    assert unknown == [], unknown


def test_the_name_checks_catch_a_wrong_name():
    """Each check fails on a name that does not exist and passes the forms it must skip."""
    sections = _sections()
    page = ("See `irmprobe/nowhere.py`, `tests/unit/test_gone.py` and `irmprobe.activations.capture.nope`; set "
            "`compare.n_control`, `pair.base/tunned`.\n\n    irmprobe run --set irm.input=tuned\n\n"
            "```python\nfrom irmprobe.irm.crossfit import two_folds, three_folds\nirm.score(texts)\n```\n"
            "Skipped: `irmprobe-runs/irmprobe.log`, `--set section.field=value`, `organism.json`, "
            "`$IRMPROBE_CACHE/stages/<stage>/<key>`, `sae.*`, `irmprobe.activations.capture.capture_pair`, "
            "`result.metrics.primary`.\n")
    assert {p for p in repo_paths(page) if not (ROOT / p).exists()} == {"irmprobe/nowhere.py",
                                                                         "tests/unit/test_gone.py"}
    assert {n for n in dotted_names(page) if not resolves(n)} == {"irmprobe.activations.capture.nope",
                                                                    "irmprobe.irm.crossfit.three_folds"}
    assert {(s, f) for s, f in config_names(page, sections) if f not in sections[s]} == {
        ("compare", "n_control"), ("pair", "tunned"), ("irm", "input")}

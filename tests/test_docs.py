"""The README is a front page and the documentation stays inside the repository: every relative link in README.md,
docs/ and bench/README.md names a file that exists (a moved or renamed doc fails here, not in a reader's browser)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(md):
    missing = []
    for target in _relative_links(md):
        path = (md.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            missing.append(target)
    assert not missing, f"{md.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("[a](docs/usage.md) [b](https://example.com) [c](#top)\n```\n[d](nowhere.md)\n```\n")
    assert _relative_links(md) == ["docs/usage.md"]


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"


def _gen_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_generated_from_the_parser():
    """docs/cli.md is the parser's (docs/gen_cli.py): a flag changed without regenerating it fails here."""
    text = _gen_cli().render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run python docs/gen_cli.py"
    for flag in ("--qat-distill-positions", "--no-padding-free", "--fsdp", "--rslora", "--no-ptq", "--lora-r"):
        assert f"`{flag}`" in text, flag
    assert "| `--max-steps` | MAX_STEPS | `60` |" in text  # with the config's default


def test_a_stale_reference_is_reported(tmp_path, monkeypatch, capsys):
    gen = _gen_cli()
    stale = tmp_path / "cli.md"
    stale.write_text(gen.render().replace("--qat-lr", "--qat-learning-rate"))
    monkeypatch.setattr(gen, "DOC", stale)
    assert gen.main(["--check"]) == 1 and "stale" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0  # regenerated

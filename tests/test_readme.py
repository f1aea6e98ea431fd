"""The README tells the truth: its test command is what CI runs, it stays a short guide whose links all lead somewhere,
and its Python quick-start works as printed."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    test_command = next(c for c in commands if "pytest" in c).split("#")[0].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_the_readme_is_a_short_guide_and_its_pages_link_to_files_that_exist():
    assert len(README.splitlines()) <= 250
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks" / "results").glob("*.md")]
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, broken
    for section in ("## Results at a glance", "## The library", "## The lab", "## Compare VeRA and LoRA",
                    "## Notebooks", "## Layout"):
        assert section in README


@pytest.mark.integration
def test_compare_quick_start_runs_as_printed(tmp_path, monkeypatch, capsys):
    section = README[README.index("## Compare VeRA and LoRA"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the snippet writes runs/quick relative to the working directory
    exec(compile(code, "README quick-start", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "9.6"
    assert "accuracy" in printed[1] and (tmp_path / "runs" / "quick" / "report.json").is_file()

"""The README's benchmark tables are generated from committed raw JSON: every bench block names its JSON,
the JSON is tracked by git, and the block is exactly what ``benchmarks.run`` renders from it today."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import run as bench

REPO = Path(__file__).resolve().parent.parent


def _check_readme(readme: Path) -> list[str]:
    """Problems found in ``readme``'s bench blocks (empty: each block equals its JSON's rendering)."""
    problems = []
    blocks = bench.readme_blocks(readme.read_text())
    if not blocks:
        problems.append(f"{readme}: no bench block")
    for source, block in blocks:
        if source is None:
            problems.append("a bench block names no raw JSON ('Raw data: [`FILE`]')")
            continue
        path = readme.parent / source
        if not path.is_file():
            problems.append(f"{source}: not found")
            continue
        expected = bench.render_markdown(json.loads(path.read_text()), image_dir="docs/bench/", title=False,
                                         source=source)
        if block != expected:
            wrong = next((f"{i}: README {a!r} vs JSON {b!r}" for i, (a, b) in
                          enumerate(zip(block.splitlines(), expected.splitlines())) if a != b), "lengths differ")
            problems.append(f"{source}: the README block differs from its rendering at line {wrong}; regenerate it "
                            f"with python -m benchmarks.run --from-json {source} --readme README.md")
    return problems


def test_readme_bench_blocks_equal_their_committed_json() -> None:
    readme = REPO / "README.md"
    assert _check_readme(readme) == []
    for source, _ in bench.readme_blocks(readme.read_text()):
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", source], cwd=REPO, capture_output=True)
        if tracked.returncode == 128 and b"not a git repository" in tracked.stderr:
            pytest.skip("not a git checkout")
        assert tracked.returncode == 0, f"{source} is cited by the README but not committed"


def test_a_changed_figure_or_claim_is_caught(tmp_path) -> None:
    """The check above fails on a block edited by hand, and on a JSON whose figures changed."""
    source = next(s for s, _ in bench.readme_blocks((REPO / "README.md").read_text()))
    (tmp_path / Path(source).parent).mkdir(parents=True)
    data = (REPO / source).read_text()
    (tmp_path / source).write_text(data)
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert _check_readme(readme) == []
    readme.write_text(readme.read_text().replace("on the front (no peer row dominates it)", "on the front", 1))
    assert "differs" in _check_readme(readme)[0]
    readme.write_text((REPO / "README.md").read_text())
    result = json.loads(data)
    row = next(r for r in result["rows"] if r["name"] == "ort-int8")
    row["build"]["options"]["reduce_range"] = True
    (tmp_path / source).write_text(json.dumps(result))
    assert "reduce_range on" in _check_readme(readme)[0]


def test_from_json_rewrites_the_block_it_is_compared_with(tmp_path) -> None:
    """`--from-json FILE --readme README.md` writes the block this test compares (round trip)."""
    source = next(s for s, _ in bench.readme_blocks((REPO / "README.md").read_text()))
    (tmp_path / Path(source).parent).mkdir(parents=True)
    (tmp_path / source).write_text((REPO / source).read_text())
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nstale\n<!-- bench:end -->\nafter\n")
    bench.main(["--from-json", str(tmp_path / source), "--readme", str(readme), "--out", str(tmp_path / "out")])
    assert _check_readme(readme) == []
    assert readme.read_text().startswith("intro\n<!-- bench:start -->\n") and "stale" not in readme.read_text()
    assert (tmp_path / "docs" / "bench" / "ppl_vs_kv.png").read_bytes().startswith(b"\x89PNG")

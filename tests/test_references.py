"""Every repository path that a config, a recipe script or a README names exists: a comment that
cites a config which was renamed misleads the next reader."""

import re
from pathlib import Path

import pytest

from conftest import REPO

RECIPES = sorted(p.parent for p in (REPO / "egs2").glob("*/asr1/run.sh"))
# egs2/... from the repository root; conf/... and local/... from a recipe folder.
PATH = re.compile(r"(?<![\w./-])((?:egs2|conf|local)/[\w./{},<>*-]*[\w}>*-])")
RUNTIME = ("downloads", "data", "dump", "exp")  # made by running a recipe
SOURCES = sorted(
    {path.resolve() for pattern in ("*.yaml", "*.sh", "*.md") for path in (REPO / "egs2").rglob(pattern)}
    | {REPO / "README.md"}
)


def named_paths(source: Path) -> list[str]:
    text = source.read_text(encoding="utf-8")
    # "{a,b}" is a brace expansion (left out); a "}" without "{" closes a YAML flow mapping
    return [m.rstrip("}") for m in PATH.findall(text) if not any(c in m for c in "<>*{")]


def exists(path: str, source: Path) -> bool:
    if path.startswith("egs2/"):
        return path.split("/")[3:4] in ([], *[[r] for r in RUNTIME]) or (REPO / path).exists()
    recipe = next((r for r in RECIPES if r in source.parents), None)
    folders = [recipe] if recipe is not None else RECIPES
    return any((folder / path).exists() for folder in folders)


@pytest.mark.parametrize("source", SOURCES, ids=[str(s.relative_to(REPO)) for s in SOURCES])
def test_named_paths_exist(source):
    missing = [path for path in named_paths(source) if not exists(path, source)]
    assert not missing, f"{source.relative_to(REPO)} names paths that do not exist: {missing}"


def test_the_check_sees_paths():
    assert "conf/train_asr.yaml" in named_paths(REPO / "egs2/asterisk_en/asr1/run.sh")

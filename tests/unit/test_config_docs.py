"""docs/configuration.md against the config models it is generated from, and every relative
link of the user-facing docs against the files and headings it names."""

from __future__ import annotations

import re
import shutil
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from serve_app.config import AppConfig, ReferenceConfig
from serve_app.deploy import config_docs

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster/README.md"]

_ROW = re.compile(r"^\| `(?P<key>\w+)` \| (?P<type>.*?) \| (?P<default>.*?) \| (?P<text>.*) \|$")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^[ ]*```.*?^[ ]*```", re.MULTILINE | re.DOTALL)


def config_models(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """`root` and every model its fields hold, directly or as list items."""
    yield root
    for field in root.model_fields.values():
        for candidate in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from config_models(candidate)


def documented_tables() -> dict[str, dict[str, list[str]]]:
    """Each heading of the generated file, and its table: key -> [type, default, text]."""
    tables: dict[str, dict[str, list[str]]] = {}
    heading = ""
    for line in (REPO / config_docs.OUTPUT).read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ")
            tables[heading] = {}
        elif match := _ROW.match(line):
            tables[heading][match["key"]] = [match["type"], match["default"], match["text"]]
    return tables


def test_generated_file_is_up_to_date() -> None:
    assert (REPO / config_docs.OUTPUT).read_text() == config_docs.render(), (
        f"{config_docs.OUTPUT} is stale: run `{config_docs.REGENERATE}`")
    assert config_docs.main(["--check", "--root", str(REPO)]) == 0


def test_every_field_of_every_config_model_is_documented() -> None:
    tables = documented_tables()
    text = (REPO / config_docs.OUTPUT).read_text()
    models = {*config_models(AppConfig), *config_models(ReferenceConfig)}
    assert len(models) >= 14
    for model in models:
        keys = set(model.model_fields)
        assert any(set(table) == keys for table in tables.values()), (
            f"no table documents exactly the keys of {model.__name__}")
        for name, field in model.model_fields.items():
            if field.description:
                assert " ".join(field.description.split()).replace("|", "\\|") in text, (
                    f"{model.__name__}.{name}: its description is not in the file")
    for heading, table in tables.items():
        for key, (type_text, default, description) in table.items():
            assert type_text and default and description, f"{heading}: `{key}` has an empty cell"


def test_each_nested_section_is_named_by_its_key_path() -> None:
    tables = documented_tables()
    for path in ("`model`", "`upstream.timeouts`", "`upstream.backends[]`",
                 "`embedding_models[]`", "`embedding_models[].batching`", "`limits`"):
        assert path in tables, f"no section {path}"
    assert set(tables["`upstream.backends[]`"]) == {"url", "dialect", "model", "api_key_env",
                                                   "weight", "max_in_flight", "health_url"}


def test_a_stale_file_fails_the_check_and_writing_mends_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "docs").mkdir()
    target = tmp_path / config_docs.OUTPUT
    shutil.copy(REPO / config_docs.OUTPUT, target)
    assert config_docs.main(["--check", "--root", str(tmp_path)]) == 0

    target.write_text(target.read_text().replace("| `max_n` |", "| `max_samples` |"))
    assert config_docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert str(config_docs.OUTPUT) in capsys.readouterr().err
    stale = target.read_text()

    assert config_docs.main(["--root", str(tmp_path)]) == 0
    assert target.read_text() != stale
    assert config_docs.main(["--check", "--root", str(tmp_path)]) == 0

    target.unlink()
    assert config_docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert not target.exists()


def test_a_field_without_a_description_stops_the_generator() -> None:
    class Undocumented(BaseModel):
        """A model with one field nobody described."""

        documented: int = Field(1, description="Has one.")
        silent: int = 2

    with pytest.raises(ValueError, match=r"Undocumented\.silent"):
        config_docs.render([config_docs.Application("Test", "x:y", Undocumented)])
    assert config_docs.main(["--check", "--root", str(REPO)]) == 0


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (`-1`, `-2` on repeats)."""
    anchors: set[str] = set()
    for line in _FENCE.sub("", markdown).splitlines():
        if not line.startswith("#"):
            continue
        base = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        anchor, repeat = base, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{base}-{repeat}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_doc_links_resolve(doc: Path) -> None:
    markdown = doc.read_text()
    broken = []
    for target in _LINK.findall(_FENCE.sub("", markdown)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: outside the repository
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / path_part).resolve() if path_part else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(
                linked.read_text()):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)

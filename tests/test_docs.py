"""The documentation generated from the code (tools/gen_docs.py): current, complete for every
registered method, and refusing a registration it cannot document."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from _compose import REPO
from distill.catalog import DISTILLERS
from distill.config import option_reference
from distill.registry import Registry


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): the generated docs


@pytest.fixture(scope="module")
def gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gen_docs", None)


def test_the_generated_docs_are_current(gen_docs):
    """README's method table, the method pages and their index, the nav and docs/options.md:
    `python tools/gen_docs.py` rewrites them."""
    files = gen_docs.generated()
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, \
            f"{path.relative_to(REPO)} is out of date: run python tools/gen_docs.py"
    assert not gen_docs.orphans(files), "a method page without a method: run gen_docs.py"
    assert "`trainer.label_smoothing`" in option_reference()


def inside(text: str, begin: str, end: str) -> str:
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_every_method_has_a_readme_row_a_page_and_a_nav_entry(gen_docs):
    """...and a place in the README's first-screen list, under its family."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    readme = inside(text, gen_docs.BEGIN, gen_docs.END)
    first_screen = inside(text, gen_docs.LIST_BEGIN, gen_docs.LIST_END)
    assert text[:text.index(gen_docs.LIST_BEGIN)].count("\n") < 40, "the list left the first screen"
    families = {line.split(":", 1)[0][2:]: line for line in first_screen.splitlines()}
    nav = inside((REPO / "mkdocs.yml").read_text(encoding="utf-8"), gen_docs.NAV_BEGIN,
                 gen_docs.NAV_END)
    index = (REPO / "docs" / "methods" / "index.md").read_text(encoding="utf-8")
    names = DISTILLERS.list()
    assert len(names) >= 30
    for name in names:
        meta = DISTILLERS.meta(name)
        assert f"| [`{name}`](docs/methods/{name}.md) | {meta['family']} |" in readme, name
        assert f"[`{name}`](docs/methods/{name}.md)" in families[meta["family"]], name
        assert f"| [`{name}`]({name}.md) |" in index, name
        assert (REPO / "docs" / "methods" / f"{name}.md").is_file(), name
        assert f"- {name}: methods/{name}.md\n" in nav, name


def test_a_method_page_quotes_its_published_rows(gen_docs):
    """Each `published_as=` label is a row of its method's page; a method with none says so."""
    for name in DISTILLERS.list():
        meta = DISTILLERS.meta(name)
        page = (REPO / "docs" / "methods" / f"{name}.md").read_text(encoding="utf-8")
        for label in meta.get("published_as", ()):
            assert f"\n| {label} |" in page, (name, label)
        if not meta.get("published_as") and not meta.get("published_in"):
            assert "has no numbers for" in page, name


def fake_registry(**meta) -> Registry:
    registry = Registry("distiller")
    registry.add("good", object, paper="A paper", family="logits", summary="Does a thing")
    registry.add("tried", object, **meta)
    return registry


COMPLETE = {"paper": "Another paper", "family": "features", "summary": "Matches features"}


def test_a_complete_registration_passes(gen_docs):
    gen_docs.check_registrations(fake_registry(**COMPLETE))
    assert gen_docs.methods_in_order(fake_registry(**COMPLETE)) == ["good", "tried"]


@pytest.mark.parametrize("change,problem", [
    ({"family": None}, "no `family=`"),
    ({"summary": None}, "no `summary=`"),
    ({"family": "logit"}, "unknown family 'logit'"),
    ({"summary": "x" * 91}, "at most 90"),
    ({"published_as": "DKD"}, "tuple of strings"),
])
def test_an_incomplete_registration_is_refused(gen_docs, change, problem):
    meta = {k: v for k, v in {**COMPLETE, **change}.items() if v is not None}
    with pytest.raises(gen_docs.RegistrationError) as exc:
        gen_docs.method_table(fake_registry(**meta))
    assert "tried: " in str(exc.value) and problem in str(exc.value)
    assert "good" not in str(exc.value)


def test_published_numbers_that_match_nothing_are_refused(gen_docs):
    ref = gen_docs.parse_reference(gen_docs.PUBLISHED.read_text(encoding="utf-8"))
    rows = gen_docs.published_pieces("dkd", {"published_as": ("DKD",)}, ref)
    assert rows and all("| DKD |" in "\n".join(paragraphs) for _, paragraphs in rows)
    with pytest.raises(gen_docs.RegistrationError, match="matches no table row"):
        gen_docs.published_pieces("dkd", {"published_as": ("DKDD",)}, ref)
    with pytest.raises(gen_docs.RegistrationError, match="is no section"):
        gen_docs.published_pieces("takd", {"published_in": ("9z",)}, ref)

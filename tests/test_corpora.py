"""acip.corpora: the built-in corpora (the real ones, fetched once and cached) and their preparation from a wheel.

The preparation tests build a small stand-in wheel, so they need neither the network nor pip.
"""

import bz2
import hashlib
import zipfile

import pytest

from acip import corpora

pytest.importorskip("mwparserfromhell")

# -- the real corpora ------------------------------------------------------------------------------------------------


def test_wikipedia_split_is_deterministic_disjoint_and_plausible():
    train, validation = corpora.wikipedia_articles("train"), corpora.wikipedia_articles("validation")
    assert corpora.wikipedia_articles("train") == train
    titles = [a["title"] for a in train], [a["title"] for a in validation]
    assert not set(titles[0]) & set(titles[1])
    assert len(set(titles[0])) == len(train) and len(set(titles[1])) == len(validation)
    n = len(train) + len(validation)
    assert n > 90 and 0.15 < len(validation) / n < 0.25
    text = [a["text"] for a in train + validation]
    assert sum(len(t.encode()) for t in text) > 2_000_000
    assert sum(len(t.split()) for t in text) > 350_000
    for junk in ("{{", "}}", "[[", "]]", "<ref", "thumb|", "Category:", "File:", "{|"):
        assert not any(junk in t for t in text), junk


def test_lee_corpus():
    docs = corpora.lee_documents()
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert 50_000 < sum(len(d.split()) for d in docs) < 80_000


def test_clean_wikitext():
    wikitext = """{{Infobox person|name=X}}
'''Albedo''' ({{IPAc-en|æ|l}}; ''albus'') is the [[diffuse reflection|diffuse reflectivity]] of a [[surface]].<ref>
A cite.</ref>
[[File:Albedo.svg|thumb|A caption]]
== Terrestrial albedo ==
{| class="wikitable"
| Fresh asphalt || 0.04
|}
Snow reflects ''most'' light.<ref name="x"/> See [http://example.org the site] or http://example.org.
* A list item &amp; more: [[Ben-Hur: A Tale of the Christ|Ben-Hur]], {{lang|la|albus}}, {{convert|3|to|5|km2|sqmi}}
== References ==
{{reflist}}
=== Sources ===
* Someone, ''A book''.
[[Category:Physics]]
[[de:Albedo]]
"""
    assert corpora.clean_wikitext(wikitext) == (
        "Albedo (albus) is the diffuse reflectivity of a surface.\n\n"
        "Terrestrial albedo\n\n"
        "Snow reflects most light. See the site or.\n"
        "A list item & more: Ben-Hur, albus, 3 to 5 km²"
    )


# -- preparation from a stand-in wheel -------------------------------------------------------------------------------


def page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
    """One <page> of a MediaWiki XML export."""
    extra = f'<redirect title="{text}"/>' if redirect else ""
    return f"<page><title>{title}</title><ns>{ns}</ns>{extra}<revision><text>{text}</text></revision></page>"


DUMP = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
    + "".join(page(f"Article {c}", f"'''Article {c}''' is a [[letter|letter]].") for c in "JBHADGCEIF")
    + page("Talk:Article A", "A discussion.", ns=1)
    + page("Old name", "Article A", redirect=True)
    + page("Another old name", "#REDIRECT [[Article B]]")
    + "</mediawiki>"
).encode()
LEE = b"First story.\n\nSecond story.\n   \nThird story.\n"


@pytest.fixture
def stand_in_wheel(tmp_path, monkeypatch):
    """A cache in tmp_path and a stand-in gensim wheel holding DUMP and LEE; returns the list of downloads."""
    wiki = bz2.compress(DUMP)
    monkeypatch.setenv("ACIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpora, "_WIKI_SHA256", hashlib.sha256(wiki).hexdigest())
    monkeypatch.setattr(corpora, "_LEE_SHA256", hashlib.sha256(LEE).hexdigest())
    downloads = []

    def download(dest):
        downloads.append(dest)
        path = f"{dest}/gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
        with zipfile.ZipFile(path, "w") as wheel:
            wheel.writestr(corpora._WIKI_MEMBER, wiki)
            wheel.writestr(corpora._LEE_MEMBER, LEE)
        return path

    monkeypatch.setattr(corpora, "_download_gensim_wheel", download)
    return downloads


def test_preparation_cleans_sorts_splits_and_caches(stand_in_wheel):
    articles = corpora.wikipedia_articles()
    assert [a["title"] for a in articles] == [f"Article {c}" for c in "ABCDEFGHIJ"]  # no talk page, no redirects
    assert articles[0]["text"] == "Article A\n\nArticle A is a letter."
    validation = corpora.wikipedia_articles("validation")
    assert [a["title"] for a in validation] == ["Article E", "Article J"]  # every fifth title
    assert len(corpora.wikipedia_articles("train")) == 8
    assert corpora.lee_documents() == ["First story.", "Second story.", "Third story."]
    assert len(stand_in_wheel) == 1  # one download for both corpora, then the cache
    assert sorted(p.name for p in corpora.cache_dir().iterdir()) == sorted(corpora._CACHE_FILES.values())
    with pytest.raises(ValueError, match="unknown Wikipedia split 'test'"):
        corpora.wikipedia_articles("test")


def test_a_wheel_with_other_contents_is_refused(stand_in_wheel, monkeypatch):
    monkeypatch.setattr(corpora, "_LEE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="lee_background.cor in .* does not have the expected SHA-256"):
        corpora.lee_documents()
    assert not corpora.cache_dir().exists()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ACIP_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert corpora.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ACIP_CACHE")
    assert corpora.cache_dir() == tmp_path / "b" / "acip"

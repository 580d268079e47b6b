"""The built-in offline corpora: a Wikipedia sample and the Lee news corpus, prepared once from gensim's test data.

Both are test data of gensim 4.4.0: its wheel is fetched once with ``pip download`` (gensim is not installed), the
two files are read out of it, checked against pinned SHA-256 digests, cleaned to prose and cached as JSONL under
:func:`cache_dir`. Later calls need neither the network nor pip. The Wikipedia sample is split by article: every
fifth title (sorted) is validation.

Attribution: the Wikipedia sample is text from English Wikipedia articles (2016 revisions) by the Wikipedia
contributors, licensed under CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/); each article's
authors are listed in its history at https://en.wikipedia.org/wiki/TITLE. We convert the wikitext to plain prose
(templates, references, tables, images and markup removed). The Lee corpus consists of news articles from the
Australian Broadcasting Corporation collected by Lee, Pincombe & Welsh (2005), "An empirical evaluation of models
of text document similarity", as distributed with gensim.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

from .folders import write_jsonl

_GENSIM = "gensim==4.4.0"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
_LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
_LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
# Bump when the cleaning changes, so that stale caches are not reused.
_CACHE_FILES = {"wiki": "enwiki-sample-v4.jsonl", "lee": "lee-background-v1.jsonl"}
_VALIDATION_EVERY = 5  # every 5th article (by title) is validation: 80/20


def cache_dir() -> Path:
    """Where the cleaned built-in corpora live: ``$ACIP_CACHE``, else ``$XDG_CACHE_HOME/acip`` (``~/.cache/acip``)."""
    if os.environ.get("ACIP_CACHE"):
        return Path(os.environ["ACIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "acip"


def wikipedia_articles(split: str | None = None) -> list[dict[str, str]]:
    """The cleaned Wikipedia sample as ``{"title", "text"}`` records sorted by title: all, "train" or "validation"."""
    articles = _cached_corpus("wiki")
    if split is None:
        return articles
    if split not in ("train", "validation"):
        raise ValueError(f"unknown Wikipedia split {split!r}: expected 'train' or 'validation'")
    in_validation = [i % _VALIDATION_EVERY == _VALIDATION_EVERY - 1 for i in range(len(articles))]
    return [article for article, v in zip(articles, in_validation) if v == (split == "validation")]


def lee_documents() -> list[str]:
    """The 300 articles of the Lee background news corpus."""
    return [record["text"] for record in _cached_corpus("lee")]


def _cached_corpus(name: str) -> list[dict[str, str]]:
    path = cache_dir() / _CACHE_FILES[name]
    if not path.exists():
        _extract_gensim_corpora()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _extract_gensim_corpora() -> None:
    # A private temporary folder per process: concurrent first runs each download, none reads a half-written wheel.
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(_download_gensim_wheel(tmp)) as wheel:
            wiki = _checked_member(wheel, _WIKI_MEMBER, _WIKI_SHA256)
            lee = _checked_member(wheel, _LEE_MEMBER, _LEE_SHA256)
    articles = sorted(_wikipedia_dump_articles(bz2.decompress(wiki)), key=lambda a: a["title"])
    news = [line.strip() for line in lee.decode("utf-8").splitlines() if line.strip()]  # one article per line
    write_jsonl(cache_dir() / _CACHE_FILES["wiki"], articles)
    lee_records = ({"title": f"lee {i:03d}", "text": text} for i, text in enumerate(news))
    write_jsonl(cache_dir() / _CACHE_FILES["lee"], lee_records)


def _download_gensim_wheel(dest: str) -> Path:
    # Only data files are read from the wheel, so pin one platform: the same file on every machine and Python.
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
        "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
        "--quiet", "--dest", dest, _GENSIM,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("gensim-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"the built-in corpora come from the {_GENSIM} wheel, and `{' '.join(command)}` failed "
            f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _checked_member(wheel: zipfile.ZipFile, member: str, sha256: str) -> bytes:
    data = wheel.read(member)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"{member} in {wheel.filename} does not have the expected SHA-256 {sha256}")
    return data


def _wikipedia_dump_articles(xml: bytes) -> Iterator[dict[str, str]]:
    """Cleaned articles of a MediaWiki XML export: main namespace only, redirects skipped."""
    root = ElementTree.fromstring(xml)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for page in root.iter(f"{ns}page"):
        title = page.findtext(f"{ns}title", "")
        wikitext = page.findtext(f"{ns}revision/{ns}text", "")
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        if wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = clean_wikitext(wikitext)
        if body:
            yield {"title": title, "text": f"{title}\n\n{body}"}


# -- wikitext to prose -----------------------------------------------------------------------------------------------

# Tags whose content is not running prose (references, tables, formulas, media).
_DROPPED_TAGS = {
    "ref", "references", "table", "gallery", "math", "chem", "ce", "score", "timeline", "imagemap", "graph",
    "templatedata", "inputbox", "categorytree", "section", "syntaxhighlight", "source", "hiero", "mapframe",
}  # fmt: skip
# Sections that hold citations and link lists rather than prose; dropped with their subsections.
_BACK_MATTER = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "citations", "footnotes", "notes and references", "references and notes", "works cited", "general references",
    "primary sources", "secondary sources",
}  # fmt: skip
# Inline templates whose words are part of the sentence; every other template (citations, infoboxes, navigation,
# pronunciation) is dropped. Values: which positional parameter holds the text.
_TEXT_TEMPLATES = {
    "lang": -1, "transl": -1, "nihongo": 0, "nowrap": 0, "nobr": 0, "small": 0, "smaller": 0, "quote": 0,
    "blockquote": 0, "quotation": 0, "angbr": 0, "sic": 0,
}  # fmt: skip
_RANGE_WORDS = {"to", "-", "–", "and", "or", "by", "x", "×", "+"}
# {{convert}} unit codes that would not read as units (most codes, km or ft, already do).
_UNITS = {"C": "°C", "F": "°F", "C-change": "°C", "F-change": "°F", "km2": "km²", "m2": "m²", "sqmi": "sq mi"}
# Links that render as no text: media, categories and interlanguage links ("de:...", "zh-min-nan:..."; always
# lower case, so that a title such as "Ran: Chaos" still shows).
_HIDDEN_LINK = re.compile(r"^\s*(?:(?i:file|image|media|category)|[a-z]{2,3}(?:-[a-z]+)*)\s*:")


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: paragraphs and heading lines; no templates, references, tables or media."""
    import mwparserfromhell
    from mwparserfromhell.nodes import Heading

    # '' and ''' are left as text: unbalanced ones otherwise stop the parser, and whole <ref>s leak through.
    code = mwparserfromhell.parse(wikitext, skip_style_tags=True)
    parts, skipping_level = [], None
    for node in code.nodes:
        if isinstance(node, Heading):
            if skipping_level is not None and node.level > skipping_level:
                continue
            skipping_level = None
            if _plain_text([node]).strip().lower() in _BACK_MATTER:
                skipping_level = node.level
                continue
        if skipping_level is None:
            parts.append(_plain_text([node]))
    return _tidy("".join(parts))


def _plain_text(nodes) -> str:
    """The text a reader sees for these parsed wikitext nodes (templates, comments and hidden links vanish)."""
    from mwparserfromhell.nodes import ExternalLink, Heading, HTMLEntity, Tag, Template, Text, Wikilink

    out = []
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, Wikilink):
            title = str(node.title)
            if _HIDDEN_LINK.match(title) and not title.lstrip().startswith(":"):  # [[:Category:X]] is visible
                continue
            shown = node.text if node.text is not None and str(node.text).strip() else node.title
            out.append(_plain_text(shown.nodes))
        elif isinstance(node, ExternalLink):
            if node.brackets and node.title is not None:  # bare URLs are not prose
                out.append(_plain_text(node.title.nodes))
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag == "br":
                out.append("\n")
            elif tag not in _DROPPED_TAGS and not node.self_closing and node.contents is not None:
                out.append(_plain_text(node.contents.nodes))
        elif isinstance(node, Heading):
            out.append(_plain_text(node.title.nodes).strip())
        elif isinstance(node, Template):
            out.append(_template_text(node))
    return "".join(out)


def _template_text(template) -> str:
    """What an inline template contributes to the sentence: a measurement, a foreign word, a quotation, or nothing."""
    name = str(template.name).strip().lower()
    params = [_plain_text(p.value.nodes).strip() for p in template.params if not p.showkey]
    if name in ("convert", "cvt") and len(params) >= 2:
        # {{convert|3|to|5|km|mi}} reads "3 to 5 km"; {{convert|1300|mi|km}} reads "1300 mi"
        if len(params) >= 4 and params[1] in _RANGE_WORDS:
            return f"{params[0]} {params[1]} {params[2]} {_UNITS.get(params[3], params[3])}"
        return f"{params[0]} {_UNITS.get(params[1], params[1])}"
    if name == "as of" and params:
        lower = template.has("lc") and str(template.get("lc").value).strip() in ("y", "yes")
        return f"{'as' if lower else 'As'} of {params[0]}"
    if name.startswith("lang-") and params:  # {{lang-grc|Ἀριστοτέλης}}
        return params[0]
    if name in _TEXT_TEMPLATES and params:
        return params[_TEXT_TEMPLATES[name]]
    return ""


def _tidy(text: str) -> str:
    """Normalise what the markup leaves behind: spacing, emptied brackets, stray quote marks, blank-line runs."""
    text = re.sub(r"[\xa0\u2002\u2003\u2009\u202f\t]", " ", text)
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words such as __NOTOC__
    text = re.sub(r"'''(?=s\b)", "'", text)  # ''Iliad'''s: the italics close, then a possessive
    text = re.sub(r"''+", "", text)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"\(\s*(?:[,;]\s*)+", "(", line)  # "(; born ...": a removed pronunciation template
        line = re.sub(r"\(\s*\)", "", line)
        line = re.sub(r" {2,}", " ", line).strip()
        line = re.sub(r" +([,.;:!?)])", r"\1", line)
        # A line without a single letter is a leftover (list markers, footnote numbers, table debris).
        lines.append(line if re.search(r"[^\W\d_]", line) else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()

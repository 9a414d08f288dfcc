"""The UI's message catalogs: same keys in both languages, nothing empty, every key the
JavaScript uses exists, and the Korean catalog is really Korean."""

from __future__ import annotations

import json
import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / "client" / "app" / "static"
HANGUL = re.compile(r"[\uac00-\ud7a3]")
# a literal catalog key in the JS: t("chats.title"), or a key kept in a table ("status.read")
KEY_LITERAL = re.compile(r"""["'`]([a-z]+(?:\.[a-z0-9_]+)+)["'`]""")
T_CALL = re.compile(r"""\bt\(\s*["'`]([^"'`]+)["'`]""")
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def catalog(lang: str) -> dict[str, str]:
    data = json.loads((STATIC / "i18n" / f"{lang}.json").read_text("utf-8"))
    assert isinstance(data, dict)
    return data


def js_sources() -> dict[str, str]:
    files = [STATIC / "app.js", *sorted((STATIC / "js").glob("*.js"))]
    return {p.name: p.read_text("utf-8") for p in files}


def test_catalogs_have_identical_keys() -> None:
    en, ko = catalog("en"), catalog("ko")
    assert len(en) > 100
    assert set(en) - set(ko) == set(), "missing in ko"
    assert set(ko) - set(en) == set(), "missing in en"


def test_no_empty_values_and_same_placeholders() -> None:
    en, ko = catalog("en"), catalog("ko")
    for key in en:
        assert isinstance(en[key], str) and en[key].strip(), key
        assert isinstance(ko[key], str) and ko[key].strip(), key
        assert set(PLACEHOLDER.findall(en[key])) == set(PLACEHOLDER.findall(ko[key])), key


def test_every_key_used_in_the_js_exists() -> None:
    en = catalog("en")
    namespaces = {k.split(".", 1)[0] for k in en}
    sources = js_sources()
    called = {k for src in sources.values() for k in T_CALL.findall(src)}
    assert len(called) > 80  # the scan really found the calls
    literals = {
        k
        for src in sources.values()
        for k in KEY_LITERAL.findall(src)
        if k.split(".", 1)[0] in namespaces
    }
    missing = sorted((called | literals) - set(en))
    assert missing == [], missing
    # error texts are looked up by code: the contract's codes all have a translation
    for code in (
        "unauthorized",
        "wrong_passphrase",
        "node_unreachable",
        "no_such_account",
        "identity_changed",
        "ambiguous_id",
        "locked",
        "not_joined",
        "internal",
    ):
        assert f"error.{code}" in en, code


def test_korean_catalog_is_korean() -> None:
    ko = catalog("ko")
    # values that are the same in any language: the bare name placeholder
    hangul = [k for k, v in ko.items() if HANGUL.search(v)]
    assert len(hangul) >= 0.95 * len(ko), sorted(set(ko) - set(hangul))
    en = catalog("en")
    assert not any(HANGUL.search(v) for k, v in en.items() if k != "onboarding.name_hint")


def test_static_files_use_no_html_parsing_or_inline_code() -> None:
    """Hostile texts are only ever set with textContent: no innerHTML and friends, no eval,
    no inline handlers or styles in the page (the CSP forbids them anyway)."""
    forbidden = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
        r"createContextualFragment|DOMParser|setAttribute\(\s*[\"']style"
    )
    for name, src in js_sources().items():
        assert not forbidden.search(src), name
    html = (STATIC / "index.html").read_text("utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"\son[a-z]+=|\sstyle=", html)
    assert "http" not in re.sub(r'name="viewport"[^>]*', "", html)  # no external assets

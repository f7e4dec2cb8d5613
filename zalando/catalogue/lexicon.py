"""A small keyword lexicon per article group, in the demo's languages (English, German, French).

:func:`text_groups` says which groups a description names; :func:`text_disagrees` flags a row whose
description names an article of another group and not the predicted one (reason ``text_disagrees``).
Matching is on whole words, ignoring case and accents (``Bottés`` = ``bottes``). Plural forms are
listed explicitly; German compounds match on their last part (``Handtasche`` names a ``Tasche``),
hyphenated words on each part (``Jeans-Shorts``), except the few in ``_NOT_ARTICLES`` that mislead
(a ``Handschuh`` is a glove). Words that are ambiguous across the three languages (``top``, ``rock``,
``haut``, ``short``, ``basket``) are left out: a false match is worse than a missed one.
"""

from __future__ import annotations

import re
import unicodedata

from zalando.labels import GROUP_NAMES

# group -> language -> words, space-separated (any case/accents; singular and plural). Words only.
LEXICON: dict[str, dict[str, str]] = {
    "Upper part": {
        "en": (
            "shirt shirts t-shirt t-shirts tee tees blouse blouses pullover pullovers sweater "
            "sweaters hoodie hoodies coat coats jacket jackets cardigan cardigans"
        ),
        "de": (
            "hemd hemden bluse blusen pullover pulli mantel mäntel jacke jacken strickjacke oberteil "
            "oberteile"
        ),
        "fr": (
            "chemise chemises chemisier chemisiers pull pulls manteau manteaux veste vestes débardeur "
            "débardeurs"
        ),
    },
    "Bottom part": {
        "en": "trousers pants jeans shorts skirt skirts leggings",
        "de": "hose hosen jeans röcke minirock shorts",
        "fr": "pantalon pantalons jean jupe jupes",
    },
    "One piece": {
        "en": "dress dresses jumpsuit jumpsuits overall overalls",
        "de": "kleid kleider overall jumpsuit",
        "fr": "robe robes combinaison combinaisons",
    },
    "Footwear": {
        "en": "shoe shoes sneaker sneakers trainer trainers boot boots sandal sandals loafer loafers",
        "de": "schuh schuhe sneaker stiefel stiefelette stiefeletten sandale sandalen",
        "fr": "chaussure chaussures baskets botte bottes bottine bottines sandale sandales",
    },
    "Bags": {
        "en": "bag bags handbag handbags backpack backpacks tote totes purse",
        "de": "tasche taschen handtasche rucksack rucksäcke",
        "fr": "sac sacs pochette pochettes cabas",
    },
}

# words that contain an article word but name something else: a Handschuh is a glove, pull-on a cut
_NOT_ARTICLES = frozenset({"handschuh", "handschuhe", "pull-on"})  # already folded
_MIN_COMPOUND_HEAD = 4  # the last part of a compound: 'hose' in 'Unterhose'
_MIN_COMPOUND_PREFIX = 3  # and at least this much before it: 'those' and 'whose' are no trousers


def fold(text: str) -> str:
    """Lower case without accents: 'Débardeur' -> 'debardeur', 'Röcke' -> 'rocke', 'ß' -> 'ss'."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _build() -> tuple[dict[str, str], dict[str, str]]:
    """Folded word -> group, and the German words that also match as the head of a compound."""
    words: dict[str, str] = {}
    heads: dict[str, str] = {}
    for group, by_lang in LEXICON.items():
        for lang, terms in by_lang.items():
            for term in terms.split():
                key = fold(term)
                if words.get(key, group) != group:
                    raise ValueError(f"lexicon: {term!r} is listed under {words[key]!r} and {group!r}")
                words[key] = group
                if lang == "de" and len(key) >= _MIN_COMPOUND_HEAD:
                    heads[key] = group
    return words, heads


_WORDS, _HEADS = _build()
# words: letters (any script) joined by inner hyphens ('t-shirt'); digits and '_' split words
_TOKEN = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


def text_groups(description: str | None) -> set[str]:
    """The groups whose articles the text names (empty for no text or no article word)."""
    if not description:
        return set()
    found: set[str] = set()
    for token in _TOKEN.findall(fold(description)):
        if token in _NOT_ARTICLES:
            continue
        for word in [token, *token.split("-")] if "-" in token else [token]:
            group = _WORDS.get(word) if word not in _NOT_ARTICLES else None
            if group is None and word not in _NOT_ARTICLES:
                group = _compound_head(word)
            if group is not None:
                found.add(group)
    return found


def _compound_head(word: str) -> str | None:
    """The group of the longest lexicon word that ends a (German) compound, if any."""
    for start in range(_MIN_COMPOUND_PREFIX, len(word) - _MIN_COMPOUND_HEAD + 1):
        group = _HEADS.get(word[start:])
        if group is not None:
            return group
    return None


def text_disagrees(description: str | None, predicted_group: str) -> bool:
    """True when the text names an article of another group and none of the predicted group."""
    if predicted_group not in GROUP_NAMES:
        raise ValueError(f"unknown group {predicted_group!r}; expected one of {', '.join(GROUP_NAMES)}")
    groups = text_groups(description)
    return bool(groups) and predicted_group not in groups

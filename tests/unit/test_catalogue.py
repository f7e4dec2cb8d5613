"""The catalogue's pure parts: the text lexicon, the demo plan, settings, the SQL files and the compose
file as data. (Everything that needs PostgreSQL is in tests/integration/test_catalogue.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from zalando.catalogue.demo import (
    DEFECT_SHARE,
    IMAGE_PREFIX,
    NOT_AN_IMAGE_KEY,
    NOUNS,
    build_demo,
    describe,
)
from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.lexicon import LEXICON, fold, text_disagrees, text_groups
from zalando.catalogue.query import PRODUCT_QUERY, normalize_country
from zalando.catalogue.schema import REQUIRED_COLUMNS, schema_sql
from zalando.catalogue.server import find_bin_dir
from zalando.labels import GROUP_NAMES, LABEL_NAMES, LABEL_TO_GROUP
from zalando.settings import Settings

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ lexicon
@pytest.mark.parametrize(
    ("text", "groups"),
    [
        ("Elegant DRESS in navy", {"One piece"}),
        ("Sommerkleid aus Leinen", {"One piece"}),  # a German compound, matched on its last part
        ("Robe légère en coton", {"One piece"}),
        ("Comfortable sneakers", {"Footwear"}),
        ("Stiefeletten in Schwarz", {"Footwear"}),
        ("BOTTINES élégantes", {"Footwear"}),
        ("Bottínes", {"Footwear"}),  # accents anywhere are ignored
        ("Slim trousers", {"Bottom part"}),
        ("Bequeme Hose", {"Bottom part"}),
        ("Pantalon en lin", {"Bottom part"}),
        ("Leather bag", {"Bags"}),
        ("Handtasche aus Leder", {"Bags"}),
        ("Sac à dos", {"Bags"}),
        ("Wool coat", {"Upper part"}),
        ("Wintermäntel", {"Upper part"}),  # umlaut folded: Mäntel = mantel
        ("Hemd aus Baumwolle", {"Upper part"}),
        ("Débardeur rouge", {"Upper part"}),
        ("T-Shirt aus Baumwolle", {"Upper part"}),
        ("Jeans-Shorts", {"Bottom part"}),
        ("A dress with matching shoes", {"One piece", "Footwear"}),
        ("Warme Handschuhe", set()),  # a glove is no shoe
        ("pull-on waist", set()),  # a cut, not a pullover
        ("a dressing gown, shoelaces, those whose", set()),  # whole words only
        ("", set()),
        (None, set()),
    ],
)
def test_text_groups_match_whole_words_ignoring_case_and_accents(text: str | None, groups: set[str]) -> None:
    assert text_groups(text) == groups


def test_text_disagrees_only_when_another_group_is_named_and_the_predicted_one_is_not() -> None:
    assert text_disagrees("Elegant dress in navy", "Footwear") is True
    assert text_disagrees("Elegant dress in navy", "One piece") is False
    assert text_disagrees("A dress with matching shoes", "Footwear") is False  # the predicted one is named
    assert text_disagrees("Made of cotton", "Bags") is False  # names no article: nothing to disagree with
    assert text_disagrees(None, "Bags") is False
    with pytest.raises(ValueError, match="unknown group"):
        text_disagrees("dress", "Dresses")


def test_lexicon_covers_every_group_in_the_three_demo_languages() -> None:
    assert set(LEXICON) == set(GROUP_NAMES)
    assert all(set(by_lang) == {"en", "de", "fr"} for by_lang in LEXICON.values())
    assert fold("Débardeur Größe") == "debardeur grosse"


def test_every_demo_noun_names_its_labels_group() -> None:
    for lang, per_label in NOUNS.items():
        assert len(per_label) == len(LABEL_NAMES)
        for label, nouns in enumerate(per_label):
            for noun in nouns:
                assert text_groups(noun) == {GROUP_NAMES[LABEL_TO_GROUP[label]]}, (lang, noun)
    rng = np.random.default_rng(0)
    for lang in NOUNS:
        for label in range(len(LABEL_NAMES)):
            assert text_groups(describe(lang, label, rng)) == {GROUP_NAMES[LABEL_TO_GROUP[label]]}


# ------------------------------------------------------------------------------ the demo plan
def _labels(n: int = 500) -> np.ndarray:
    return np.arange(n) % len(LABEL_NAMES)


def test_demo_plan_has_every_defect_and_the_primary_is_not_always_the_lowest_image_id() -> None:
    plan = build_demo(_labels(), n_products=300, seed=3)
    assert len(plan.products) == len(plan.truth) == 300
    assert set(plan.defects) == set(DEFECT_SHARE) and all(v >= 1 for v in plan.defects.values())
    defect = {t[0]: t[5] for t in plan.truth}
    links: dict[int, list[tuple[int, int]]] = {}
    for pid, iid, idx in plan.links:
        links.setdefault(pid, []).append((iid, idx))
    key_of = {iid: key for iid, key, _ in plan.images}
    for pid, _title in plan.products:
        got = links.get(pid, [])
        primaries = [iid for iid, idx in got if idx == 0]
        if defect[pid] == "no_images":
            assert got == []
            continue
        assert 1 <= len(got) <= 4
        assert len(primaries) == (2 if defect[pid] == "several_primary_images" else 1), pid
        if defect[pid] == "missing_object":
            assert key_of[primaries[0]].startswith(f"{IMAGE_PREFIX}/missing/")
            assert key_of[primaries[0]] not in plan.pngs
        if defect[pid] == "not_an_image":
            assert key_of[primaries[0]] == NOT_AN_IMAGE_KEY
    assert [pid for pid, title in plan.products if title is None] == [
        pid for pid, d in defect.items() if d == "null_title"
    ]
    # the primary is often not the product's lowest image id
    not_lowest = [pid for pid, got in links.items() if min(got)[1] != 0]
    assert len(not_lowest) > 50
    # truth: the primary shows the product's own test image, whose label is the product's
    truth = {t[0]: t for t in plan.truth}
    for pid, got in links.items():
        if defect[pid] not in ("missing_object", "not_an_image"):
            primary_key = key_of[min(iid for iid, idx in got if idx == 0)]
            assert plan.pngs[primary_key] == truth[pid][1]


def test_demo_descriptions_come_in_two_or_three_countries_some_translated() -> None:
    plan = build_demo(_labels(), n_products=300, seed=3)
    countries: dict[int, set[str]] = {}
    for pid, country, original, _translated in plan.descriptions:
        countries.setdefault(pid, set()).add(country)
        assert original
    assert {len(c) for c in countries.values()} == {2, 3}
    assert all(c <= {"us", "de", "fr"} for c in countries.values())
    translated = [d for d in plan.descriptions if d[3] is not None]
    assert 0.2 < len(translated) / len(plan.descriptions) < 0.8
    # the lexicon catches the deliberately wrong descriptions, and only those
    truth = {t[0]: t for t in plan.truth}
    flagged = {pid for pid, _c, o, t in plan.descriptions if text_disagrees(t or o, truth[pid][4])}
    assert flagged == {pid for pid, t in truth.items() if t[5] == "wrong_description"}


def test_demo_plan_is_reproducible_and_refuses_tiny_catalogues() -> None:
    a, b = build_demo(_labels(), n_products=50, seed=9), build_demo(_labels(), n_products=50, seed=9)
    assert a.links == b.links and a.descriptions == b.descriptions
    assert build_demo(_labels(), n_products=50, seed=10).links != a.links
    assert len(build_demo(_labels(40), n_products=100, seed=1).products) == 100  # more products than images
    with pytest.raises(CatalogueError, match="at least 10"):
        build_demo(_labels(), n_products=3)


# ------------------------------------------------------------------------------ query text, schema, settings
def test_the_query_binds_its_inputs_and_fixes_the_studys_joins() -> None:
    assert set(re.findall(r"%\((\w+)\)s", PRODUCT_QUERY)) == {"country", "limit"}
    assert "{" not in PRODUCT_QUERY  # never formatted
    sql = " ".join(PRODUCT_QUERY.split())
    assert "ON d.product_id = p.id AND d.country_code = %(country)s" in sql
    assert "ON i.id = pr.image_id" in sql
    where = sql.split("FROM product AS p", 1)[1]
    assert "WHERE" not in where  # no WHERE over the joined rows: products without images stay
    assert normalize_country(" US ") == "us"
    for bad in ("us' OR '1'='1", "usa", "", "u1"):
        with pytest.raises(CatalogueError, match="two letters"):
            normalize_country(bad)


def test_schema_sql_is_idempotent_ddl_with_keys_and_our_group_names() -> None:
    ddl = schema_sql()
    creates = re.findall(r"CREATE (?:TABLE|INDEX)\s+(\S+\s+\S+\s+\S+)", ddl)
    assert creates and all(c.startswith("IF NOT EXISTS") for c in creates)
    for table in REQUIRED_COLUMNS:
        assert f"CREATE TABLE IF NOT EXISTS {table} (" in ddl
    assert ddl.count("REFERENCES product (id)") == 3 and "REFERENCES image (id)" in ddl
    groups = re.search(r'CHECK \("group" IN \(([^)]*)\)\)', ddl)
    assert groups and tuple(g.strip(" '\n") for g in groups.group(1).split(",")) == GROUP_NAMES


def test_catalog_settings_hide_the_dsn_and_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZALANDO_CATALOG_DSN", "postgresql://u:dsn-secret-42@db:5432/cat")
    monkeypatch.setenv("ZALANDO_CATALOG_PASSWORD", "pw-secret-43")
    s = Settings()
    assert not s.embedded_catalog
    assert "dsn-secret-42" not in repr(s) and "pw-secret-43" not in repr(s)
    monkeypatch.setenv("ZALANDO_CATALOG_DSN", " ")
    assert Settings().embedded_catalog and Settings().catalog_port == 5433


def test_missing_server_binaries_name_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match=r"install Debian's `postgresql` package"):
        find_bin_dir(tmp_path)
    for version in ("9", "15", "16"):
        (tmp_path / version / "bin").mkdir(parents=True)
        for exe in ("initdb", "pg_ctl"):
            (tmp_path / version / "bin" / exe).touch()
    assert find_bin_dir(tmp_path) == tmp_path / "16" / "bin"  # newest by number, not by string
    assert find_bin_dir(tmp_path, version="15") == tmp_path / "15" / "bin"


def test_compose_has_a_catalog_database_and_gives_the_worker_its_dsn_without_a_password() -> None:
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    worker = compose["services"]["worker"]["environment"]
    dsn = worker["ZALANDO_CATALOG_DSN"]
    assert dsn.startswith("postgresql://catalog@postgres:5432/catalog") and ":" not in dsn.split("@")[0][13:]
    assert "CATALOG_DB_PASSWORD" in worker["ZALANDO_CATALOG_PASSWORD"]
    postgres = compose["services"]["postgres"]
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    init = (REPO / "infra" / "postgres-init" / "10-catalog.sh").read_text()
    assert "CREATE DATABASE catalog OWNER catalog" in init and "PASSWORD :'catalog_password'" in init
    assert "postgresql" in (REPO / ".ci" / "setup-system.sh").read_text()

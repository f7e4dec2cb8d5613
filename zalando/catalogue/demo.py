"""A demo catalogue built from the Fashion-MNIST test split: DEMO DATA, never a retailer's.

Each product shows one test image's article: 1-4 images of that label in random ``image_index``
order (so the primary is not always the lowest image id), images as PNG objects in the lake with the
lake's URLs (``s3://`` on S3), descriptions in 2-3 countries (us, de, fr), some translated, some not.
Deliberate defects, one per affected product, in fixed proportions (:data:`DEFECT_SHARE`): products
without images, two images with index 0, a URL to a missing object, a URL to a non-image object,
NULL titles, and descriptions naming an article of another group. The truth (test index, label, group,
defect) is kept in the ``demo_truth`` table, whose rows also mark the catalogue as demo data.

:func:`build_demo` plans it all from the labels (pure, no I/O); :func:`load_demo` writes the PNGs
first, then replaces the database rows in one transaction (so a failure leaves the old catalogue).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psycopg
from PIL import Image
from pydantic import BaseModel

from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.schema import check_schema
from zalando.labels import GROUP_NAMES, LABEL_NAMES, LABEL_TO_GROUP
from zalando.lake import Lake

log = logging.getLogger(__name__)

IMAGE_PREFIX = "catalogue/images/demo"
NOT_AN_IMAGE_KEY = f"{IMAGE_PREFIX}/not-an-image.png"
NOT_AN_IMAGE = b"<!doctype html><html><head><title>404</title></head><body>Not Found</body></html>\n"
MIN_PRODUCTS = 10

# share of products with each deliberate defect (at least one product each); disjoint sets
DEFECT_SHARE: dict[str, float] = {
    "no_images": 0.02,
    "several_primary_images": 0.01,
    "missing_object": 0.01,
    "not_an_image": 0.01,
    "null_title": 0.02,
    "wrong_description": 0.03,
}

COUNTRY_LANGUAGE = {"us": "en", "de": "de", "fr": "fr"}
HOME_LANGUAGE_P = {"en": 0.5, "de": 0.3, "fr": 0.2}  # the language a retailer wrote the original in
TRANSLATED_P = 0.7  # chance that a foreign-language original has a translation for the country

DEMO_TRUTH_DDL = """
CREATE TABLE IF NOT EXISTS demo_truth (
    product_id bigint   PRIMARY KEY REFERENCES product (id) ON DELETE CASCADE,
    test_index integer  NOT NULL,
    label      smallint NOT NULL,
    label_name text     NOT NULL,
    "group"    text     NOT NULL,
    defect     text,
    loaded_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE demo_truth IS
    'DEMO DATA: the catalogue was generated from the Fashion-MNIST test split (zalando catalog demo)';
"""

# article nouns per label and language; every one is in the lexicon under the label's group
NOUNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "en": (
        ("t-shirt", "tee"),
        ("trousers", "jeans", "pants"),
        ("pullover", "sweater"),
        ("dress",),
        ("coat", "jacket"),
        ("sandals",),
        ("shirt", "blouse"),
        ("sneakers", "trainers"),
        ("bag", "handbag", "backpack"),
        ("ankle boots", "boots"),
    ),
    "de": (
        ("T-Shirt",),
        ("Hose", "Jeans"),
        ("Pullover", "Pulli"),
        ("Kleid", "Sommerkleid"),
        ("Mantel", "Winterjacke"),
        ("Sandalen",),
        ("Hemd", "Bluse"),
        ("Sneaker", "Turnschuhe"),
        ("Tasche", "Handtasche", "Rucksack"),
        ("Stiefeletten", "Stiefel"),
    ),
    "fr": (
        ("t-shirt", "débardeur"),
        ("pantalon", "jean"),
        ("pull", "pullover"),
        ("robe",),
        ("manteau", "veste"),
        ("sandales",),
        ("chemise", "chemisier"),
        ("baskets",),
        ("sac", "pochette"),
        ("bottines", "bottes"),
    ),
}
_WORDS = {
    "en": {
        "adj": ("Classic", "Comfortable", "Elegant", "Lightweight", "Casual"),
        "colour": ("black", "navy", "white", "grey", "olive", "red"),
        "material": ("cotton", "wool", "leather", "linen", "recycled polyester"),
        "template": "{adj} {noun} in {colour}, made of {material}.",
    },
    "de": {
        "adj": ("Klassisch", "Bequem", "Elegant", "Leicht", "Lässig"),
        "colour": ("Schwarz", "Marineblau", "Weiß", "Grau", "Olivgrün", "Rot"),
        "material": ("Baumwolle", "Wolle", "Leder", "Leinen", "recyceltem Polyester"),
        "template": "{noun} in {colour} aus {material}: {adj} im Alltag.",
    },
    "fr": {
        "adj": ("classique", "confortable", "élégant", "léger", "décontracté"),
        "colour": ("noir", "bleu marine", "blanc", "gris", "vert olive", "rouge"),
        "material": ("coton", "laine", "cuir", "lin", "polyester recyclé"),
        "template": "{noun} {adj} en {material}, coloris {colour}.",
    },
}
_TITLE_ADJ = ("Classic", "Essential", "Urban", "Weekend", "Studio", "Heritage")


@dataclass
class DemoPlan:
    """Every row and object of a demo catalogue, before anything is written."""

    products: list[tuple[int, str | None]] = field(default_factory=list)  # id, title
    images: list[tuple[int, str, str]] = field(default_factory=list)  # id, lake key, alt text
    links: list[tuple[int, int, int]] = field(default_factory=list)  # product id, image id, index
    descriptions: list[tuple[int, str, str, str | None]] = field(default_factory=list)
    truth: list[tuple[int, int, int, str, str, str | None]] = field(default_factory=list)
    pngs: dict[str, int] = field(default_factory=dict)  # lake key -> test index
    defects: dict[str, int] = field(default_factory=dict)


class DemoSummary(BaseModel):
    """What `zalando catalog demo` loaded."""

    products: int
    images: int
    links: int
    descriptions: int
    translated: int
    descriptions_by_country: dict[str, int]
    products_without_us_description: int
    defects: dict[str, int]
    objects_written: int
    objects_reused: int
    image_prefix: str
    seconds: float


def _defect_of(n_products: int, rng: np.random.Generator) -> list[str | None]:
    if n_products < MIN_PRODUCTS:
        raise CatalogueError(f"demo catalogue: --products {n_products}: at least {MIN_PRODUCTS} are needed")
    order = rng.permutation(n_products)
    out: list[str | None] = [None] * n_products
    start = 0
    for name, share in DEFECT_SHARE.items():
        count = max(1, round(n_products * share))
        for i in order[start : start + count]:
            out[int(i)] = name
        start += count
    return out


def describe(lang: str, label: int, rng: np.random.Generator) -> str:
    """A product description in a language, naming the article of a label."""
    words = _WORDS[lang]

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    text = words["template"].format(
        adj=pick(words["adj"]),
        noun=pick(NOUNS[lang][label]),
        colour=pick(words["colour"]),
        material=pick(words["material"]),
    )
    return text[0].upper() + text[1:]


def _other_group_label(label: int, rng: np.random.Generator) -> int:
    others = [lab for lab in range(len(LABEL_NAMES)) if LABEL_TO_GROUP[lab] != LABEL_TO_GROUP[label]]
    return others[int(rng.integers(len(others)))]


def _countries(rng: np.random.Generator) -> list[str]:
    all_three = list(COUNTRY_LANGUAGE)
    if rng.random() < 0.5:
        return all_three
    return sorted(rng.choice(all_three, size=2, replace=False).tolist())


def build_demo(labels: np.ndarray, *, n_products: int = 2000, seed: int = 42) -> DemoPlan:
    """Plan a demo catalogue of n products from the test split's labels (pure: no I/O)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    by_label = [np.flatnonzero(labels == lab) for lab in range(len(LABEL_NAMES))]
    rounds = -(-n_products // len(labels))
    primaries = np.concatenate([rng.permutation(len(labels)) for _ in range(rounds)])[:n_products]
    defects = _defect_of(n_products, rng)
    languages = list(HOME_LANGUAGE_P)
    plan = DemoPlan(defects={name: defects.count(name) for name in DEFECT_SHARE})
    next_image_id = 1
    for i, (test_index, defect) in enumerate(zip(primaries.tolist(), defects, strict=True)):
        product_id, label = i + 1, int(labels[test_index])
        name = LABEL_NAMES[label]
        title = (
            None
            if defect == "null_title"
            else f"{_TITLE_ADJ[i % len(_TITLE_ADJ)]} {name.lower()} (demo {product_id})"
        )
        plan.products.append((product_id, title))
        plan.truth.append((product_id, test_index, label, name, GROUP_NAMES[LABEL_TO_GROUP[label]], defect))
        # images: ids ascending, indexes a random permutation, so the primary is any of them
        k = 0 if defect == "no_images" else int(rng.integers(1, 5))
        if defect == "several_primary_images":
            k = max(k, 2)
        indexes = rng.permutation(k).tolist()
        if defect == "several_primary_images":
            indexes[indexes.index(1)] = 0
        extras = iter(rng.choice(by_label[label], size=k).tolist())  # other views of the same article
        primary_shown = False
        for image_index in indexes:
            image_id = next_image_id
            next_image_id += 1
            view = next(extras) if image_index or primary_shown else test_index
            primary_shown = primary_shown or image_index == 0
            key = f"{IMAGE_PREFIX}/fmnist-test-{view:05d}.png"
            if image_index == 0 and defect == "missing_object":
                key = f"{IMAGE_PREFIX}/missing/{image_id}.png"
            elif image_index == 0 and defect == "not_an_image":
                key = NOT_AN_IMAGE_KEY
            else:
                plan.pngs[key] = view
            plan.images.append((image_id, key, f"{name} (demo, Fashion-MNIST test image {view})"))
            plan.links.append((product_id, image_id, image_index))
        # descriptions: the original in the home language, a translation for some other countries
        text_label = _other_group_label(label, rng) if defect == "wrong_description" else label
        home = languages[int(rng.choice(len(languages), p=list(HOME_LANGUAGE_P.values())))]
        original = describe(home, text_label, rng)
        for country in _countries(rng):
            lang = COUNTRY_LANGUAGE[country]
            translated = None
            if lang != home and rng.random() < TRANSLATED_P:
                translated = describe(lang, text_label, rng)
            plan.descriptions.append((product_id, country, original, translated))
    return plan


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 28x28 array as a greyscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_demo_images(lake: Lake, plan: DemoPlan, images: np.ndarray, *, workers: int = 8) -> tuple[int, int]:
    """Write the plan's PNGs (and the non-image object) to the lake, skipping those already there.

    Returns (written, reused). Keys are content-addressed by test index, so a re-run writes nothing.
    """
    existing = set(lake.list_keys(IMAGE_PREFIX))
    todo = {k: v for k, v in plan.pngs.items() if k not in existing}

    def put(item: tuple[str, int]) -> None:
        lake.write_bytes(item[0], encode_png(images[item[1]]))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(put, todo.items()))
    written = len(todo)
    if NOT_AN_IMAGE_KEY not in existing:
        lake.write_bytes(NOT_AN_IMAGE_KEY, NOT_AN_IMAGE)
        written += 1
    return written, len(plan.pngs) + 1 - written


def _copy(cur: psycopg.Cursor, statement: str, rows: Iterable[tuple]) -> None:
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _clear_earlier_demo(cur: psycopg.Cursor) -> None:
    """Empty the catalogue when it holds only an earlier demo; refuse when it holds anything else."""
    cur.execute("LOCK TABLE product, image, product_images, product_description IN EXCLUSIVE MODE")
    cur.execute(
        """
        SELECT (SELECT count(*) FROM product AS p
                WHERE NOT EXISTS (SELECT 1 FROM demo_truth AS t WHERE t.product_id = p.id)),
               (SELECT count(*) FROM image AS i
                WHERE NOT EXISTS (SELECT 1 FROM product_images AS pi JOIN demo_truth AS t USING (product_id)
                                  WHERE pi.image_id = i.id))
        """
    )
    foreign_products, foreign_images = cur.fetchone()  # type: ignore[misc]
    if foreign_products or foreign_images:
        raise CatalogueError(
            f"demo catalogue: the catalogue holds {foreign_products} products and {foreign_images} images "
            "that are not demo data; the demo loads only into an empty catalogue or over an earlier demo"
        )
    cur.execute(
        "TRUNCATE product_classification, product_images, product_description, demo_truth, image, product"
    )


def load_demo(
    conn: psycopg.Connection,
    lake: Lake,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    n_products: int = 2000,
    seed: int = 42,
) -> DemoSummary:
    """Load a demo catalogue of n products (replacing an earlier demo) from the test split's arrays."""
    t0 = time.perf_counter()
    check_schema(conn)
    plan = build_demo(labels, n_products=n_products, seed=seed)
    written, reused = write_demo_images(lake, plan, images)  # objects first, rows last
    urls = {key: lake.uri(key) for key in {k for _, k, _ in plan.images}}
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(DEMO_TRUTH_DDL)
            _clear_earlier_demo(cur)
            _copy(cur, "COPY product (id, title) FROM STDIN", plan.products)
            _copy(
                cur, "COPY image (id, url, alt_text) FROM STDIN", ((i, urls[k], a) for i, k, a in plan.images)
            )
            _copy(cur, "COPY product_images (product_id, image_id, image_index) FROM STDIN", plan.links)
            _copy(
                cur,
                "COPY product_description (product_id, country_code, original_text, translated_text) FROM STDIN",
                plan.descriptions,
            )
            _copy(
                cur,
                'COPY demo_truth (product_id, test_index, label, label_name, "group", defect) FROM STDIN',
                plan.truth,
            )
            cur.execute("ANALYZE product, image, product_images, product_description")
    except psycopg.Error as e:
        raise CatalogueError(
            f"demo catalogue: loading failed, nothing changed: {str(e).strip().splitlines()[0]}"
        ) from None
    by_country: dict[str, int] = {}
    for _, country, _, _ in plan.descriptions:
        by_country[country] = by_country.get(country, 0) + 1
    with_us = {pid for pid, country, _, _ in plan.descriptions if country == "us"}
    summary = DemoSummary(
        products=len(plan.products),
        images=len(plan.images),
        links=len(plan.links),
        descriptions=len(plan.descriptions),
        translated=sum(1 for d in plan.descriptions if d[3] is not None),
        descriptions_by_country=dict(sorted(by_country.items())),
        products_without_us_description=len(plan.products) - len(with_us),
        defects=plan.defects,
        objects_written=written,
        objects_reused=reused,
        image_prefix=lake.uri(IMAGE_PREFIX),
        seconds=round(time.perf_counter() - t0, 2),
    )
    log.info(
        "demo catalogue: %d products, %d images loaded in %.1fs",
        summary.products,
        summary.images,
        summary.seconds,
    )
    return summary


def demo_products(conn: psycopg.Connection) -> int:
    """How many products are demo data (0 when the demo table does not exist)."""
    row = conn.execute("SELECT to_regclass('demo_truth') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    return int(conn.execute("SELECT count(*) FROM demo_truth").fetchone()[0])  # type: ignore[index]

-- The retailer's catalogue: our schema (the study's drawing of it is lost).
-- Applied by `zalando catalog init` (zalando/catalogue/schema.py) in one transaction; every
-- statement is idempotent, and tables a retailer's database already has are left as they are
-- (check_schema then names any column we need that is missing).

CREATE TABLE IF NOT EXISTS catalogue_schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS product (
    id         bigint PRIMARY KEY,
    title      text,                                   -- retailers leave it empty: NULL allowed
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS image (
    id         bigint PRIMARY KEY,
    url        text NOT NULL CHECK (url <> ''),        -- s3://, file:// or http(s)://
    alt_text   text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Which images show a product; image_index 0 is the primary (most relevant) one.
-- (product_id, image_index) is deliberately NOT unique: retailers' data has two images with index 0,
-- and the query reports that (several_primary_images) instead of the schema refusing the whole load.
CREATE TABLE IF NOT EXISTS product_images (
    product_id  bigint  NOT NULL REFERENCES product (id) ON DELETE CASCADE,
    image_id    bigint  NOT NULL REFERENCES image (id) ON DELETE CASCADE,
    image_index integer NOT NULL CHECK (image_index >= 0),
    PRIMARY KEY (product_id, image_id)
);
CREATE INDEX IF NOT EXISTS product_images_primary_idx ON product_images (product_id) WHERE image_index = 0;
CREATE INDEX IF NOT EXISTS product_images_image_idx ON product_images (image_id);

-- One description per product and country (ISO 3166 alpha-2, lower case: 'us', 'de', 'fr').
-- original_text is the retailer's own text; translated_text its translation for that country.
CREATE TABLE IF NOT EXISTS product_description (
    product_id      bigint NOT NULL REFERENCES product (id) ON DELETE CASCADE,
    country_code    text   NOT NULL CHECK (country_code ~ '^[a-z]{2}$'),
    original_text   text,
    translated_text text,
    PRIMARY KEY (product_id, country_code)
);

-- The write-back: the latest group of each product, upserted once per scored batch.
-- image_id, image_url and image_sha256 record which primary image was scored (for incremental runs).
CREATE TABLE IF NOT EXISTS product_classification (
    product_id    bigint           PRIMARY KEY REFERENCES product (id) ON DELETE CASCADE,
    "group"       text             NOT NULL
        CHECK ("group" IN ('Upper part', 'Bottom part', 'One piece', 'Footwear', 'Bags')),
    confidence    double precision NOT NULL CHECK (confidence >= 0 AND confidence <= 1),
    model_version text             NOT NULL,
    batch_id      text             NOT NULL,
    scored_at     timestamptz      NOT NULL,
    image_id      bigint,
    image_url     text,
    image_sha256  text
);

-- The write-back's ledger (zalando/catalogue/writeback.py): one row per batch of this catalogue.
-- The flow registers a batch BEFORE its lake commit (registered_at); the write-back fills in the rest in
-- the same transaction as its upsert (written_back_at and the counts). A registered batch that the lake
-- committed but that has no written_back_at (a crash between the lake commit and the upsert) is written
-- back by the next run's repair, from the lake's committed predictions.
CREATE TABLE IF NOT EXISTS catalogue_batches (
    batch_id        text        PRIMARY KEY,
    registered_at   timestamptz NOT NULL,
    committed_at    timestamptz,                  -- the lake commit, when known
    written_back_at timestamptz,                  -- NULL: not written back (yet)
    predictions     integer CHECK (predictions >= 0),    -- rows handed to the write-back
    written         integer CHECK (written >= 0),        -- inserted or updated
    unchanged       integer CHECK (unchanged >= 0),      -- the same row was already there
    kept_newer      integer CHECK (kept_newer >= 0),     -- a later score was already there
    products_gone   integer CHECK (products_gone >= 0),  -- deleted from the catalogue since
    CHECK (written_back_at IS NULL OR (predictions IS NOT NULL AND written IS NOT NULL
           AND unchanged IS NOT NULL AND kept_newer IS NOT NULL AND products_gone IS NOT NULL))
);

INSERT INTO catalogue_schema_version (version) VALUES (1) ON CONFLICT (version) DO NOTHING;

"""Fashion-MNIST data: IDX parsing, sources with checksums, validation, ingest, splits, EDA."""

"""The retailer's catalogue in PostgreSQL: the embedded server, our schema, the product query, a demo
catalogue and the text lexicon. Nothing here runs at import time."""

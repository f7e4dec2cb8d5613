"""The pipeline's steps on the lake, one module per stage.

``storage`` (the lake answers), ``data`` (verify, ingest, dataset version, EDA), ``training``
(plan, train, evaluate), ``promotion`` (gate, decide, promote), ``reporting`` (the run's report),
``scoring`` (plan a batch, score a shard, commit the batch), ``monitoring`` (drift of a batch) and
``maintenance`` (expire the lake tables' old snapshots, remove unreferenced files).

A step reads references from the lake, calls the library's pure functions, writes its outputs to
the lake and returns a small typed (pydantic) result. Each Prefect task in ``tasks/`` calls exactly
one step (retries and caching live there); the CLI and tests can call them with no orchestrator.
Nothing here imports Prefect.
"""

"""Batch scoring: shard-parallel, exactly-once, streaming, through the fastest runtime.

Public API (no Prefect here; the flow ``batch_scoring`` wraps these):

* :func:`prepare_batch` -> :class:`BatchPlan` (describe + pin model version + skip committed + shards)
* :func:`run_shard` / :func:`score_shard` -> :class:`ShardResult` (one shard, exactly once)
* :func:`finalize_batch` -> :class:`BatchResult` (reconcile, then one Iceberg commit of the batch's
  shard files into ``predictions``; its row in ``batches`` last)
* :func:`score_batch` (all three in one call), :func:`backfill` (one batch per location or day)
* :func:`score_shadow` -> :class:`ShadowResult` (issue 15: the challenger beside the champion, into
  ``shadow_predictions`` and ``shadow_agreement``; ``score_batch(shadow=True)`` calls it)
* :func:`load_champion_predictor` (checked bundle, ONNX Runtime or torch, cached per process;
  the predictors themselves are :mod:`zalando.runtime` and :mod:`zalando.models.predictor`)

Where each part lives: ``locations`` (where a batch may be read from: its boundary), ``batch`` (a
batch's inputs, planned into shards), ``inputs`` (reading and decoding a shard's inputs, quarantine
reason codes), ``shard`` (scoring one shard, its marker), ``commit`` (reconciling and committing a
batch), ``run`` (the drivers and the backfill), ``query`` (reading back, with time travel),
``shadow`` (shadow scoring and its agreement). The tables (``predictions``, ``quarantine``,
``batches``, the shadow's two), their schemas and the batch filters are in
:mod:`zalando.lake.tables`; the keys of a batch's plain objects (shard markers, embedding sample) in
:mod:`zalando.lake.keys`.
"""

from zalando.scoring.batch import (
    DEMO_SOURCE,
    Batch,
    InputFile,
    ScoringInputError,
    ShardRef,
    ShardTarget,
    describe_batch,
    find_demo_batch,
    make_batch_id,
    plan_shards,
)
from zalando.scoring.champion import (
    ChampionPredictor,
    clear_predictor_cache,
    load_champion_predictor,
    resolve_model_version,
)
from zalando.scoring.commit import BatchResult, batch_summary, finalize_batch, is_batch_committed, reset_batch
from zalando.scoring.query import predictions_preview, recent_batches, scored_versions
from zalando.scoring.run import BackfillEntry, BatchPlan, backfill, prepare_batch, run_shard, score_batch
from zalando.scoring.shadow import ShadowResult, find_challenger, score_shadow
from zalando.scoring.shard import ScoringError, ScoringOptions, ShardResult, score_shard

__all__ = [
    "DEMO_SOURCE",
    "BackfillEntry",
    "Batch",
    "BatchPlan",
    "BatchResult",
    "ChampionPredictor",
    "InputFile",
    "ScoringError",
    "ScoringInputError",
    "ScoringOptions",
    "ShadowResult",
    "ShardRef",
    "ShardResult",
    "ShardTarget",
    "backfill",
    "batch_summary",
    "clear_predictor_cache",
    "describe_batch",
    "find_demo_batch",
    "finalize_batch",
    "find_challenger",
    "is_batch_committed",
    "load_champion_predictor",
    "make_batch_id",
    "plan_shards",
    "predictions_preview",
    "recent_batches",
    "scored_versions",
    "prepare_batch",
    "reset_batch",
    "resolve_model_version",
    "run_shard",
    "score_batch",
    "score_shadow",
    "score_shard",
]

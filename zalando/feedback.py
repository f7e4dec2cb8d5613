"""Reviewers' feedback labels: the decision rows, the checks every new decision passes, and the files
they come in (a CSV, or Label Studio's JSON export) and go out in (Label Studio's task import format).

Every decision is one append-only row (:data:`FEEDBACK_SCHEMA`): image id, batch id, model version,
predicted group, label (a group name or ``unusable``), reviewer, time and source (``ui`` or
``import``). :func:`record_decisions` checks proposed decisions against the batch's predictions and
the decisions already recorded, appends the good ones through a :class:`FeedbackStore` and gives
every bad one a reason: unknown batch, unknown image id, unknown label, or a label that conflicts
with an earlier decision for the same image of the same batch. Repeating an earlier decision is not
an error; it is counted and not written again.

Nothing here touches storage: the store (``zalando.ui.store.LakeStore`` today, an Iceberg table
tomorrow) does the reads and the writes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlparse

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from zalando.errors import DataError
from zalando.labels import GROUP_KEYS, GROUP_NAMES

log = logging.getLogger(__name__)

UNUSABLE = "unusable"
"""The label for "not a fashion article / unusable"."""

LABELS: tuple[str, ...] = (*GROUP_NAMES, UNUSABLE)
"""Every label a decision may carry: the five group names, then ``unusable``."""

Source = Literal["ui", "import"]

FEEDBACK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("batch_id", pa.string()),
        ("model_version", pa.string()),
        ("predicted_group", pa.string()),
        ("label", pa.string()),
        ("reviewer", pa.string()),
        ("decided_at", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
    ]
)

# Label Studio: the names in the labeling config that exports and imports agree on
LS_FROM_NAME = "group"
LS_TO_NAME = "image"
LABEL_STUDIO_CONFIG = (
    "<View>\n"
    f'  <Image name="{LS_TO_NAME}" value="$image" zoom="true"/>\n'
    f'  <Choices name="{LS_FROM_NAME}" toName="{LS_TO_NAME}" choice="single" showInline="true">\n'
    + "".join(f'    <Choice value="{label}"/>\n' for label in LABELS)
    + "  </Choices>\n</View>\n"
)
"""A Label Studio labeling config whose tasks and results match :func:`label_studio_tasks`."""

_ALIASES = {
    **{name.lower(): name for name in GROUP_NAMES},
    **{key: name for key, name in zip(GROUP_KEYS, GROUP_NAMES, strict=True)},
    UNUSABLE: UNUSABLE,
    "not a fashion article": UNUSABLE,
    "not a fashion article / unusable": UNUSABLE,
}
_MAX_REVIEWER = 120


class FeedbackFileError(DataError):
    """A feedback file that cannot be read at all (missing, not CSV or JSON, required columns absent)."""


class Decision(BaseModel):
    """One reviewer's decision on one scored image: a row of the feedback table."""

    model_config = ConfigDict(frozen=True)

    image_id: str
    batch_id: str
    model_version: str
    predicted_group: str
    label: str
    reviewer: str
    decided_at: datetime
    source: Source


class Proposal(BaseModel):
    """A decision as proposed (by the page or a file), before it is checked; ``where`` names its origin."""

    where: str
    image_id: str | None = None
    batch_id: str | None = None
    label: str | None = None
    reviewer: str | None = None
    model_version: str | None = None
    decided_at: datetime | None = None
    problem: str | None = None  # set when the file's own row is malformed


class Rejected(BaseModel):
    """A proposal that was not recorded, and why."""

    where: str
    image_id: str | None
    batch_id: str | None
    reason: str


@dataclass(frozen=True)
class BatchPredictions:
    """What the checks need of a scored batch: its model version and each image's predicted group."""

    model_version: str
    predicted: Mapping[str, str]  # image_id -> predicted group name


@dataclass
class RecordResult:
    """What :func:`record_decisions` did: decisions written, repeats left alone, proposals rejected."""

    accepted: list[Decision] = field(default_factory=list)
    repeated: list[Decision] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # where the store put them (lake keys today)


class FeedbackStore(Protocol):
    """The storage that :func:`record_decisions` needs (``zalando.ui.store.LakeStore`` implements it)."""

    def batch_predictions(self, batch_id: str, model_version: str | None = None) -> BatchPredictions | None:
        """The batch's predictions (newest model version by default); None for an unknown batch."""
        ...

    def read_feedback(self, batch_id: str | None = None) -> list[Decision]:
        """Every recorded decision (of one batch), oldest first."""
        ...

    def append_feedback(self, decisions: Sequence[Decision]) -> list[str]:
        """Append decisions (never rewriting earlier ones); returns where they went."""
        ...


# ------------------------------------------------------------------------------------ labels


def normalise_label(text: str | None) -> str | None:
    """The canonical label for a group name, group key (``one_piece``) or ``unusable``; None if unknown."""
    if text is None:
        return None
    return _ALIASES.get(" ".join(str(text).split()).lower())


def clean_reviewer(text: str | None, default: str = "anonymous") -> str:
    """A reviewer name fit to store: printable, single-spaced, at most 120 characters."""
    name = "".join(ch for ch in str(text or "") if ch.isprintable())
    name = " ".join(name.split())[:_MAX_REVIEWER]
    return name or default


# ------------------------------------------------------------------------------------ checks


def record_decisions(
    store: FeedbackStore,
    proposals: Sequence[Proposal],
    *,
    source: Source,
    default_reviewer: str = "anonymous",
    now: Callable[[], datetime] | None = None,
) -> RecordResult:
    """Check proposals and append the good ones through ``store`` (one write per batch).

    A proposal is rejected for: a malformed row, a missing or unknown batch, a model version the
    batch was not scored with, an image id the batch's predictions do not hold, an unknown label,
    or a label that differs from an earlier decision on the same image of the same batch (earlier
    in the store, or earlier in ``proposals``). The same label again is a repeat: kept out, no error.
    """
    clock = now or (lambda: datetime.now(UTC))
    result = RecordResult()
    batches: dict[tuple[str, str | None], BatchPredictions | None] = {}
    earlier: dict[str, dict[str, Decision]] = {}
    for p in proposals:
        reason = p.problem or _missing_fields(p)
        if reason:
            result.rejected.append(_reject(p, reason))
            continue
        assert p.batch_id is not None and p.image_id is not None
        key = (p.batch_id, p.model_version)
        if key not in batches:
            batches[key] = store.batch_predictions(p.batch_id, p.model_version)
        preds = batches[key]
        if preds is None:
            why = f"unknown batch {p.batch_id!r}" + (
                f" (or not scored with model {p.model_version!r})" if p.model_version else ""
            )
            result.rejected.append(_reject(p, why))
            continue
        if p.image_id not in preds.predicted:
            result.rejected.append(_reject(p, f"unknown image id {p.image_id!r} in batch {p.batch_id!r}"))
            continue
        label = normalise_label(p.label)
        if label is None:
            result.rejected.append(
                _reject(p, f"unknown label {p.label!r}; expected one of: {', '.join(LABELS)}")
            )
            continue
        if p.batch_id not in earlier:
            earlier[p.batch_id] = first_decisions(store.read_feedback(p.batch_id))
        decision = Decision(
            image_id=p.image_id,
            batch_id=p.batch_id,
            model_version=preds.model_version,
            predicted_group=preds.predicted[p.image_id],
            label=label,
            reviewer=clean_reviewer(p.reviewer, default_reviewer),
            decided_at=_utc(p.decided_at) if p.decided_at else clock(),
            source=source,
        )
        before = earlier[p.batch_id].get(p.image_id)
        if before is not None and before.label != label:
            result.rejected.append(_reject(p, conflict_reason(before)))
        elif before is not None:
            result.repeated.append(decision)
        else:
            earlier[p.batch_id][p.image_id] = decision
            result.accepted.append(decision)
    if result.accepted:
        result.written = store.append_feedback(result.accepted)
    log.info(
        "feedback (%s): %d accepted, %d repeated, %d rejected",
        source,
        len(result.accepted),
        len(result.repeated),
        len(result.rejected),
    )
    return result


def conflict_reason(before: Decision) -> str:
    return (
        f"conflicts with the earlier decision {before.label!r} by {before.reviewer} "
        f"at {before.decided_at:%Y-%m-%d %H:%M:%S} UTC"
    )


def first_decisions(decisions: Sequence[Decision]) -> dict[str, Decision]:
    """The decision that counts per image (of one batch): the earliest; later conflicting ones lose.

    Two reviewers deciding the same image at the same moment can both pass the checks; readers of
    the feedback table resolve that race the same way: the first decision wins.
    """
    out: dict[str, Decision] = {}
    for d in sorted(decisions, key=lambda d: (d.decided_at, d.reviewer, d.label)):
        out.setdefault(d.image_id, d)
    return out


def _missing_fields(p: Proposal) -> str | None:
    missing = [n for n in ("image_id", "batch_id", "label") if not getattr(p, n)]
    return f"missing {', '.join(missing)}" if missing else None


def _reject(p: Proposal, reason: str) -> Rejected:
    return Rejected(where=p.where, image_id=p.image_id, batch_id=p.batch_id, reason=reason)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# ------------------------------------------------------------------------------------ rows <-> Arrow


def decisions_to_table(decisions: Sequence[Decision]) -> pa.Table:
    """Decisions as a table with :data:`FEEDBACK_SCHEMA`."""
    rows = [d.model_dump() for d in decisions]
    return pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)


def decisions_from_table(table: pa.Table) -> list[Decision]:
    """Table rows (any column order, extra columns ignored) back to decisions."""
    names = FEEDBACK_SCHEMA.names
    return [Decision(**{k: r[k] for k in names}) for r in table.select(names).to_pylist()]


# ------------------------------------------------------------------------------------ files in


@dataclass
class ParsedFile:
    """The proposals of a feedback file, and how many of its tasks had no annotation."""

    kind: Literal["csv", "label-studio"]
    proposals: list[Proposal]
    unlabelled: int = 0


def read_feedback_file(path: str | Path) -> ParsedFile:
    """A CSV (image_id, batch_id, label[, reviewer, model_version, decided_at]) or a Label Studio
    JSON export; ``.json``/``.csv`` decide, otherwise the first character does. Raises
    :class:`FeedbackFileError` when the file itself cannot be read."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FeedbackFileError(f"feedback file {p}: does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FeedbackFileError(
            f"feedback file {p}: cannot be read as UTF-8 text ({e.__class__.__name__})"
        ) from None
    suffix = p.suffix.lower()
    is_json = suffix == ".json" or (suffix != ".csv" and text.lstrip()[:1] in ("[", "{"))
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FeedbackFileError(
                f"feedback file {p}: not valid JSON ({e.msg} at line {e.lineno})"
            ) from None
        return parse_label_studio(data, name=str(p))
    return parse_csv(text, name=str(p))


def parse_csv(text: str, *, name: str = "CSV") -> ParsedFile:
    """Proposals from CSV text with a header row; the columns image_id, batch_id and label are required."""
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in ("image_id", "batch_id", "label") if c not in header]
    if missing:
        raise FeedbackFileError(
            f"feedback file {name}: missing column(s) {', '.join(missing)} "
            f"(header: {', '.join(header) or 'none'}); expected image_id,batch_id,label[,reviewer]"
        )
    reader.fieldnames = header
    proposals = []
    for row in reader:
        line = reader.line_num
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not any(values.values()):
            continue
        problem = "more fields than the header has" if None in row else None
        decided_at, bad_time = _parse_time(values.get("decided_at"))
        proposals.append(
            Proposal(
                where=f"line {line}",
                image_id=values.get("image_id") or None,
                batch_id=values.get("batch_id") or None,
                label=values.get("label") or None,
                reviewer=values.get("reviewer") or None,
                model_version=values.get("model_version") or None,
                decided_at=decided_at,
                problem=problem or bad_time,
            )
        )
    return ParsedFile("csv", proposals)


def parse_label_studio(data: Any, *, name: str = "JSON") -> ParsedFile:
    """Proposals from a Label Studio JSON export: a list of tasks, each with ``data`` (``image_id``
    and ``batch_id``, or an ``image`` URL this page serves) and ``annotations[].result[].value.choices``.

    Every annotation that is not cancelled is one proposal; tasks with none are counted as unlabelled.
    """
    if isinstance(data, dict) and isinstance(data.get("tasks"), list):
        data = data["tasks"]
    if not isinstance(data, list):
        raise FeedbackFileError(f"feedback file {name}: a Label Studio export is a JSON list of tasks")
    proposals: list[Proposal] = []
    unlabelled = 0
    for i, task in enumerate(data, start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data", {}), dict):
            proposals.append(Proposal(where=f"task {i}", problem="not a Label Studio task object"))
            continue
        task_data = task.get("data") or {}
        image_id, batch_id = _task_ids(task_data)
        annotations = task.get("annotations", task.get("completions")) or []
        annotations = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
        if not annotations:
            unlabelled += 1
            continue
        where = f"task {task.get('id', i)}"
        for j, ann in enumerate(annotations, start=1):
            choices, problem = _choices(ann.get("result"))
            decided_at, bad_time = _parse_time(ann.get("created_at"))
            proposals.append(
                Proposal(
                    where=where if len(annotations) == 1 else f"{where} annotation {j}",
                    image_id=image_id,
                    batch_id=batch_id,
                    label=choices[0] if choices else None,
                    reviewer=_annotator(ann.get("completed_by")),
                    model_version=_text(task_data.get("model_version")),
                    decided_at=decided_at,
                    problem=problem or bad_time,
                )
            )
    return ParsedFile("label-studio", proposals, unlabelled)


_IMAGE_PATH = re.compile(r"/images/(?P<batch>[^/]+)/(?P<image>.+)\.png$")


def _task_ids(task_data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """image_id and batch_id of a task: its data fields, else read from the image URL this page serves."""
    image_id, batch_id = _text(task_data.get("image_id")), _text(task_data.get("batch_id"))
    url = task_data.get(LS_TO_NAME)
    if (image_id is None or batch_id is None) and isinstance(url, str):
        m = _IMAGE_PATH.search(urlparse(url).path)
        if m:
            batch_id = batch_id or unquote(m["batch"])
            image_id = image_id or unquote(m["image"])
    return image_id, batch_id


def _choices(result: Any) -> tuple[list[str], str | None]:
    """The chosen labels of an annotation's result list, or a problem."""
    if not isinstance(result, list):
        return [], "annotation has no result list"
    chosen: list[str] = []
    for r in result:
        if isinstance(r, dict) and r.get("type", "choices") == "choices":
            value = r.get("value") or {}
            chosen += [str(c) for c in value.get("choices") or []]
    if not chosen:
        return [], "annotation has no choice"
    if len(set(chosen)) > 1:
        return (
            chosen,
            f"annotation has {len(set(chosen))} choices ({', '.join(sorted(set(chosen)))}); one expected",
        )
    return chosen, None


def _annotator(value: Any) -> str | None:
    if isinstance(value, dict):
        for k in ("email", "username", "first_name", "id"):
            if value.get(k):
                return f"labelstudio:{value[k]}"
        return None
    if value is None or value == "":
        return None
    return f"labelstudio:{value}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _parse_time(value: Any) -> tuple[datetime | None, str | None]:
    if value in (None, ""):
        return None, None
    try:
        return _utc(datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))), None
    except ValueError:
        return None, f"decided_at {value!r} is not an ISO 8601 time"


# ------------------------------------------------------------------------------------ files out


def label_studio_tasks(
    rows: Sequence[Mapping[str, Any]], image_url: Callable[[str, str], str]
) -> list[dict[str, Any]]:
    """Label Studio tasks (its JSON import format) for prediction rows, with the model's guess as a
    pre-annotation (``predictions`` with a ``choices`` result) that a reviewer confirms or corrects.

    ``rows``: prediction rows (image_id, batch_id, model_version, pred_group_name, confidence, prob_*).
    ``image_url(batch_id, image_id)``: the URL this page serves the image at.
    """
    tasks = []
    for r in rows:
        pred = str(r["pred_group_name"])
        probs = {
            name: round(float(r[f"prob_{key}"]), 4)
            for key, name in zip(GROUP_KEYS, GROUP_NAMES, strict=True)
            if f"prob_{key}" in r
        }
        tasks.append(
            {
                "data": {
                    LS_TO_NAME: image_url(str(r["batch_id"]), str(r["image_id"])),
                    "image_id": str(r["image_id"]),
                    "batch_id": str(r["batch_id"]),
                    "model_version": str(r["model_version"]),
                    "predicted_group": pred,
                    "confidence": round(float(r["confidence"]), 4),
                    "probabilities": probs,
                },
                "predictions": [
                    {
                        "model_version": str(r["model_version"]),
                        "score": round(float(r["confidence"]), 4),
                        "result": [
                            {
                                "from_name": LS_FROM_NAME,
                                "to_name": LS_TO_NAME,
                                "type": "choices",
                                "value": {"choices": [pred]},
                            }
                        ],
                    }
                ],
            }
        )
    return tasks

"""The text feature in scoring: a product's review reason from its description, and how often it fires.

A scored product whose description names an article of another group than the predicted one, and none
of the predicted group (:func:`zalando.catalogue.lexicon.text_disagrees`), goes to needs-review with
reason ``text_disagrees``. :func:`summarize_text_checks` counts it over a batch (the demo's number).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel

from zalando.catalogue.lexicon import text_disagrees, text_groups

TEXT_DISAGREES = "text_disagrees"


def review_reason(description: str | None, predicted_group: str) -> str | None:
    """``text_disagrees`` when the description contradicts the predicted group, else None."""
    return TEXT_DISAGREES if text_disagrees(description, predicted_group) else None


class TextCheckSummary(BaseModel):
    """How the text check went over a set of scored products."""

    products: int
    with_description: int
    naming_an_article: int  # the lexicon found a group in the description
    disagreeing: int  # review reason text_disagrees
    disagreeing_by_predicted_group: dict[str, int]

    @property
    def share_of_products(self) -> float:
        return self.disagreeing / self.products if self.products else 0.0

    @property
    def share_of_described(self) -> float:
        """Of the products the check could judge (their description names an article)."""
        return self.disagreeing / self.naming_an_article if self.naming_an_article else 0.0

    def line(self) -> str:
        """One line for a log or a report."""
        return (
            f"text_disagrees: {self.disagreeing} of {self.products} products "
            f"({100 * self.share_of_products:.1f}%; {100 * self.share_of_described:.1f}% of the "
            f"{self.naming_an_article} whose description names an article)"
        )


def summarize_text_checks(scored: Iterable[tuple[str | None, str]]) -> TextCheckSummary:
    """Count the text check over (description, predicted group) pairs of scored products."""
    products = described = naming = 0
    by_group: Counter[str] = Counter()
    for description, group in scored:
        products += 1
        if description:
            described += 1
            if text_groups(description):
                naming += 1
        if text_disagrees(description, group):
            by_group[group] += 1
    return TextCheckSummary(
        products=products,
        with_description=described,
        naming_an_article=naming,
        disagreeing=sum(by_group.values()),
        disagreeing_by_predicted_group=dict(sorted(by_group.items())),
    )

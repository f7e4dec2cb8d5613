"""Group names, keys and ids."""

from __future__ import annotations

import numpy as np
import pytest

from zalando.errors import ConfigError
from zalando.labels import GROUP_KEYS, GROUP_NAMES, group_index


def test_group_index_accepts_names_keys_and_ids() -> None:
    for i, (name, key) in enumerate(zip(GROUP_NAMES, GROUP_KEYS, strict=True)):
        assert group_index(name) == group_index(key) == group_index(i) == group_index(np.int8(i)) == i
    assert group_index(" ONE PIECE ") == 2


@pytest.mark.parametrize("bad", ["Hats", 5, -1, True, 2.0])
def test_group_index_rejects_unknown_groups(bad: object) -> None:
    with pytest.raises(ConfigError, match="unknown; use one of Upper part"):
        group_index(bad)  # type: ignore[arg-type]

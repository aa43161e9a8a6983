"""error.page_hinkley checks, before first use, that River's Page-Hinkley privates still mean what they meant."""

from __future__ import annotations

import pytest
from river.drift import PageHinkley

from drift.detectors import ErrorPageHinkley
from drift.detectors import river_check


@pytest.fixture(autouse=True)
def _fresh_check():
    river_check.page_hinkley_agrees.cache_clear()
    yield
    river_check.page_hinkley_agrees.cache_clear()


def test_pinned_river_agrees_and_the_sample_fires_on_the_rise() -> None:
    assert river_check.page_hinkley_agrees()
    test = PageHinkley(**river_check._PARAMS)
    fired = [i for i, x in enumerate(river_check._sample()) if (test.update(x), test.drift_detected)[1]]
    assert fired and 60 <= fired[0] < 70


def test_a_private_that_keeps_its_name_but_not_its_meaning_stops_the_detector(monkeypatch) -> None:
    update = PageHinkley.update

    def lowest_is_now_a_running_max(self, x):  # same names, other meaning: _min_increase no longer the minimum
        update(self, x)
        self._min_increase = max(self._min_increase if self._x_mean.n > 1 else -1e9, self._sum_increase)

    monkeypatch.setattr(PageHinkley, "update", lowest_is_now_a_running_max)
    with pytest.raises(river_check.RiverChanged, match="min_increase"):
        ErrorPageHinkley("m1")


def test_a_renamed_private_stops_the_detector(monkeypatch) -> None:
    reset = PageHinkley._reset

    def renamed(self):
        reset(self)
        self._mean = self.__dict__.pop("_x_mean")

    monkeypatch.setattr(PageHinkley, "_reset", renamed)
    with pytest.raises(river_check.RiverChanged, match="AttributeError"):
        ErrorPageHinkley("m1")

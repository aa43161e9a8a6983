"""The hashed features' fields and how each field's name is spelled: read by the featurizer
(:mod:`streams.features`) and its native block path (:mod:`streams.slot_kernels`), which must spell
every name the same way (the spelling is what gets hashed), and the price's bucket, which the kernel
makes too."""

from __future__ import annotations

import math


def price_bucket(price: float) -> int:
    """Half-octave price buckets: 0-1, 1-1.4, 1.4-2, ... so +41% in price moves one bucket."""
    return int(2 * math.log2(1.0 + max(price, 0.0)))


FIELDS: tuple[str, ...] = (
    "bias",
    "merchant",
    "item",
    "category",
    "price_bucket",
    "hour",
    "weekday",
    "device",
    "page",
    "position",
    "user",
    "user×category",
    "user×item",
    "category×device",
    "page×position",
    "merchant×category",
    "user_affinity",
    "category×hour",
)

# How each field's name is spelled, by position in FIELDS (the spelling is what gets hashed).
NAME_FORMATS: tuple[str, ...] = (
    "bias", "merchant={0}", "item={0}/{1}", "category={0}", "price_bucket={0}", "hour={0}", "weekday={0}",
    "device={0}", "page={0}", "position={0}", "user={0}/{1}", "user×category={0}/{1}|{2}", "user×item={0}/{1}|{2}",
    "category×device={0}|{1}", "page×position={0}|{1}", "merchant×category={0}|{1}", "user_affinity={0}",
    "category×hour={0}|{1}",
)

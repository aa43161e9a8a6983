"""Catalog titles for the generated stream: words that carry an item's category and its quality.

The simulator's users have a latent taste per category (``preference[user, category]`` in the click
model of :mod:`streams.generator`), and every item has a latent quality (``item_quality``, liked by every
user). A title is ``"{brand} {tier} {word} {word} #{n}"``: two distinct words from its category's
vocabulary (:data:`VOCABULARY`, the same words in every merchant that sells the category, so a text
feature space is shared across merchants), a tier word from the item's quality tercile within its
merchant's category (:data:`TIERS`), and the item's merchant-local number (titles stay distinct). Nothing in it
names a user. The words are drawn from their own seeded stream (``seed``), so adding them leaves every
click, order and price of the generator unchanged.

>>> titles = catalog_titles(3, ["books", "books", "books", "pet"], np.array([0, 0, 0, 1]),
...                         np.array([0.1, -0.4, 0.9, 2.0]), ["Acme", "Luma", "Vela", "Orbit"], np.array([4, 7, 9, 1]))
>>> titles[:2]
['Acme classic poetry thriller #4', 'Luma basic poetry thriller #7']
>>> titles[2:]
['Vela premium hardcover memoir #9', 'Orbit premium cat litter leash #1']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TIERS = ("basic", "classic", "premium")  # quality terciles within a category, low to high
VOCABULARY: dict[str, tuple[str, ...]] = {
    "books": ("novel", "paperback", "hardcover", "memoir", "cookbook", "poetry", "thriller", "bestseller"),
    "music": ("vinyl", "album", "record", "soundtrack", "jazz", "symphony", "concert", "songbook"),
    "games": ("console", "videogame", "controller", "multiplayer", "puzzle", "strategy", "arcade", "gamepad"),
    "toys": ("doll", "plush", "lego", "puzzle", "kite", "teddy", "playset", "robot"),
    "baby": ("stroller", "diaper", "crib", "pacifier", "onesie", "nursery", "bib", "rattle"),
    "beauty": ("lipstick", "mascara", "serum", "perfume", "moisturizer", "skincare", "makeup", "nail polish"),
    "health": ("vitamin", "supplement", "thermometer", "bandage", "probiotic", "pharmacy", "first aid", "protein"),
    "grocery": ("coffee", "pasta", "cereal", "olive oil", "snack", "tea", "chocolate", "spice"),
    "pet": ("dog food", "cat litter", "leash", "aquarium", "kibble", "pet bed", "chew toy", "birdseed"),
    "stationery": ("notebook", "pen", "pencil", "envelope", "stapler", "planner", "marker", "sticky notes"),
    "shoes": ("sneaker", "boot", "sandal", "loafer", "heel", "running shoe", "slipper", "trainer"),
    "apparel": ("shirt", "dress", "jeans", "jacket", "sweater", "hoodie", "skirt", "trousers"),
    "jewelry": ("necklace", "ring", "bracelet", "earring", "pendant", "diamond", "gold chain", "brooch"),
    "watches": ("wristwatch", "chronograph", "smartwatch", "watch strap", "dial", "automatic watch", "quartz",
                "stopwatch"),
    "bags": ("backpack", "handbag", "suitcase", "tote", "wallet", "duffel", "purse", "luggage"),
    "sports": ("football", "tennis racket", "yoga mat", "dumbbell", "basketball", "cycling", "jersey", "treadmill"),
    "outdoor": ("tent", "sleeping bag", "hiking", "camping", "lantern", "compass", "canoe", "rain jacket"),
    "garden": ("lawnmower", "seeds", "flower pot", "hose", "fertilizer", "rake", "planter", "hedge trimmer"),
    "tools": ("drill", "hammer", "screwdriver", "wrench", "saw", "toolbox", "pliers", "sander"),
    "auto": ("car tire", "motor oil", "windshield", "car battery", "brake pad", "dashcam", "wiper", "car seat"),
    "kitchen": ("frying pan", "blender", "knife set", "saucepan", "cutting board", "kettle", "toaster", "cookware"),
    "home": ("cushion", "curtain", "rug", "blanket", "vase", "candle", "bedding", "towel"),
    "furniture": ("sofa", "armchair", "dining table", "bookshelf", "wardrobe", "bed frame", "desk", "dresser"),
    "lighting": ("lamp", "chandelier", "light bulb", "lantern", "ceiling light", "floor lamp", "led strip",
                 "sconce"),
    "electronics": ("television", "charger", "hdmi cable", "power bank", "projector", "remote", "router",
                    "smart speaker"),
    "phones": ("smartphone", "phone case", "screen protector", "mobile", "android", "iphone", "sim card",
               "cellphone"),
    "computers": ("laptop", "keyboard", "monitor", "mouse", "graphics card", "notebook computer", "ssd",
                  "desktop pc"),
    "audio": ("headphones", "earbuds", "speaker", "amplifier", "subwoofer", "turntable", "microphone",
              "soundbar"),
    "cameras": ("camera", "lens", "tripod", "mirrorless", "camcorder", "flash", "dslr", "photo"),
    "appliances": ("washing machine", "refrigerator", "dishwasher", "microwave", "vacuum cleaner", "dryer", "oven",
                   "air conditioner"),
}
SALT = 0x7E47  # the title words' own random stream, apart from the simulation's


def quality_tiers(groups: np.ndarray, quality: np.ndarray, initial: int | None = None) -> np.ndarray:
    """Tercile (0, 1, 2) of each item's quality within its group (a merchant's category), cut at the
    terciles of the first ``initial`` items (the catalog at the start: items a drift adds later get a
    tier without moving anyone else's)."""
    initial = len(quality) if initial is None else initial
    tiers = np.zeros(len(quality), dtype=np.int64)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        base = quality[rows[rows < initial]] if (rows < initial).any() else quality[rows]
        cuts = np.quantile(base, [1 / 3, 2 / 3])
        tiers[rows] = np.searchsorted(cuts, quality[rows], side="right")
    return tiers


def catalog_titles(seed: int, categories: Sequence[str], groups: np.ndarray, quality: np.ndarray,
                   brands: Sequence[str], numbers: np.ndarray, initial: int | None = None) -> list[str]:
    """One title per item (see the module docstring). Item ``k``'s words depend only on ``seed`` and ``k``
    (one row of draws per item), so appending items never changes earlier titles."""
    draws = np.random.default_rng([seed, SALT]).integers(0, 8, (len(categories), 2))
    first = draws[:, 0]
    second = (first + 1 + draws[:, 1] % 7) % 8  # a different word of the same vocabulary
    tiers = quality_tiers(np.asarray(groups), np.asarray(quality, dtype=np.float64), initial)
    return [f"{brand} {TIERS[t]} {VOCABULARY[c][a]} {VOCABULARY[c][b]} #{k}"
            for c, brand, t, a, b, k in zip(categories, brands, tiers.tolist(), first.tolist(), second.tolist(),
                                            np.asarray(numbers).tolist(), strict=True)]


__all__ = ["VOCABULARY", "TIERS", "catalog_titles", "quality_tiers"]

"""``feature.user_category.cusum``: how well users' own earlier sessions predict the categories they choose."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable


from drift.detectors.base import CALIBRATED, Detector


class TasteShift(Detector):
    """Users stop choosing the categories their own history predicts: a one-sided CUSUM on a taste score.

    A change of tastes (concept drift) can leave every share the platform counts unchanged (the same
    categories are shown, clicked and bought as often as before, only by *other* users), and an online
    model re-learns it within ~1k events, so the error barely rises. What does move at once is the link
    between a user and a category. Each ``update((user_id, category[, session_id]))`` (a category the user
    chose: a page they navigated to, a recommendation slot, a clicked item) scores the category against the
    user's own history of *earlier sessions* (a session agrees with itself whatever the tastes, so its
    choices join the history when the user's next session starts; without a session id at once)::

        score = log( P_user(category) / P_merchant(category) ),
        P_user = (n_user[c] + prior * P_merchant) / (n_user + prior),  P_merchant = (n[c] + 1) / (n + K)

    (positive when the history predicts the choice; users without a history give no score). Scores are
    standardized by a reference (up to ``reference`` scores, lagging ``lag`` scores behind, so a change
    does not leak into it before it is found), clipped to ``±clip`` and accumulated as
    ``S = max(0, S + (mean_ref - score) / sd_ref - slack)``; ``S > threshold`` is drift. Only a *drop* counts:
    histories grow, so the score rises on its own. After firing, the CUSUM and its reference start over
    (re-armed after ``min_reference`` new scores), while user histories are kept. Memory: at most
    ``max_users`` user histories (least recently active evicted), each halved beyond ``history_cap`` choices.

    Example (600 users who each favour one of 6 categories; at choice 20 000 every user's favourite moves on):
        >>> import numpy as np
        >>> rng = np.random.default_rng(6)
        >>> favourite = rng.integers(0, 6, 600)
        >>> det = TasteShift("m1", threshold=30.0)
        >>> fired = []
        >>> for i in range(30_000):
        ...     user = int(rng.integers(600))
        ...     liked = (favourite[user] + (i >= 20_000)) % 6
        ...     category = liked if rng.random() < 0.5 else int(rng.integers(6))
        ...     if (event := det.update((f"u{user}", f"c{category}"), timestamp=float(i))) is not None:
        ...         fired.append(event.event_index)
        >>> len(fired), 20_000 <= fired[0] < 20_300
        (1, True)
    """

    family = "feature"
    statistic = "cusum"

    def __init__(self, merchant_id: str, name: str = "feature.user_category.cusum", *, slack: float = 0.3,
                 threshold: float = CALIBRATED.user_category_threshold, min_reference: int = 100, reference: int = 3000, lag: int = 200,
                 clip: float = 3.0, prior: float = 1.0, max_users: int = 20_000, history_cap: int = 64,
                 model_version: str | None = None, cooldown: int = 0, warmup: int = 0) -> None:
        super().__init__(merchant_id, name, model_version=model_version, cooldown=cooldown, warmup=warmup)
        if threshold <= 0 or slack < 0 or clip <= 0 or prior <= 0:
            raise ValueError("threshold, clip and prior must be > 0 and slack >= 0")
        if min_reference < 2 or reference < min_reference or lag < 0 or max_users < 1 or history_cap < 2:
            raise ValueError("need 2 <= min_reference <= reference, lag >= 0, max_users >= 1, history_cap >= 2")
        self.slack, self.threshold, self.clip, self.prior = slack, threshold, clip, prior
        self.min_reference, self.reference, self.lag = min_reference, reference, lag
        self.max_users, self.history_cap = max_users, history_cap
        self.users: OrderedDict[Hashable, dict[Hashable, float]] = OrderedDict()
        self.category_counts: dict[Hashable, float] = {}
        self.n_choices = 0.0
        self.n_scores = 0
        self.cusum = 0.0
        self._armed = False
        self._reference: deque[float] = deque()
        self._pending: deque[float] = deque()
        self._sum = self._sum_sq = 0.0
        self._since: tuple[int, float] = (0, 0.0)  # where S last left 0: the change's estimated start
        self._since_scores: list[float] = [0.0, 0.0]  # count and sum of scores since then

    def score(self, user_id: Hashable, category: Hashable) -> float | None:
        """The choice's log lift under the user's history (None for a user without one); does not learn."""
        found = self.users.get(user_id)
        history = found[0] if found else None
        if not history or self.n_choices <= 0:
            return None
        merchant_share = (self.category_counts.get(category, 0.0) + 1.0) / (self.n_choices + len(self.category_counts) + 1)
        user_total = sum(history.values())
        user_share = (history.get(category, 0.0) + self.prior * merchant_share) / (user_total + self.prior)
        return math.log(user_share / merchant_share)

    def _learn(self, user_id: Hashable, category: Hashable, session: Hashable | None) -> None:
        """Add the choice to the user's history, or to the session's pending choices (history when it ends)."""
        found = self.users.get(user_id)
        if found is None:
            found = self.users[user_id] = [{}, session, {}]  # history, open session, its pending choices
            if len(self.users) > self.max_users:
                self.users.popitem(last=False)
        else:
            self.users.move_to_end(user_id)
        history, open_session, pending = found
        if session is None or session != open_session:
            self._commit(history, pending)
            found[1] = session
        pending[category] = pending.get(category, 0.0) + 1.0
        if session is None:
            self._commit(history, pending)
        self.category_counts[category] = self.category_counts.get(category, 0.0) + 1.0
        self.n_choices += 1.0

    def _commit(self, history: dict, pending: dict) -> None:
        for category, count in pending.items():
            history[category] = history.get(category, 0.0) + count
        pending.clear()
        if sum(history.values()) > self.history_cap:  # recent choices weigh more; counts stay bounded
            for key in history:
                history[key] /= 2.0

    def _observe(self, value, index: int, timestamp: float):
        user_id, category, *session = value
        score = self.score(user_id, category)
        self._learn(user_id, category, session[0] if session else None)
        if score is None:
            return None
        self.n_scores += 1
        if not self._armed:  # (re)arming: the first scores of a regime are its reference
            self._add_reference(score)
            self._armed = len(self._reference) >= self.min_reference
            return None
        count = len(self._reference)
        mean = self._sum / count
        sd = math.sqrt(max(self._sum_sq / count - mean * mean, 1e-12))
        z = min(max((mean - score) / sd, -self.clip), self.clip)
        if self.cusum == 0.0:
            self._since, self._since_scores = (index, timestamp), [0.0, 0.0]
        self.cusum = max(0.0, self.cusum + z - self.slack)
        self._since_scores[0] += 1
        self._since_scores[1] += score
        self._measured(self.cusum)
        if self.cusum > self.threshold:
            n, total = self._since_scores
            return self.cusum, self.threshold, self._since, {
                "reference_mean": mean, "reference_sd": sd, "mean_since_change": total / n,
                "scores_since_change": n, "reference_size": count}
        self._pending.append(score)
        if len(self._pending) > self.lag:
            self._add_reference(self._pending.popleft())
        return None

    def _add_reference(self, score: float) -> None:
        self._reference.append(score)
        self._sum += score
        self._sum_sq += score * score
        if len(self._reference) > self.reference:
            old = self._reference.popleft()
            self._sum -= old
            self._sum_sq -= old * old

    def _after_detection(self) -> None:
        """Start the CUSUM and its reference over in the new regime; user histories stay."""
        self.cusum = 0.0
        self._armed = False
        self._reference.clear(), self._pending.clear()
        self._sum = self._sum_sq = 0.0

    def state(self) -> dict:
        return {**super().state(), "cusum": self.cusum, "threshold": self.threshold, "armed": self._armed,
                "reference_size": len(self._reference), "scores": self.n_scores, "users": len(self.users)}

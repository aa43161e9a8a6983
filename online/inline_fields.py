"""Dataclasses pickled field by field, so their instances keep their attributes inline (:class:`InlineFields`:
the recommender's candidate state, ``online.candidates``)."""

from __future__ import annotations

from collections import deque
from dataclasses import MISSING
from operator import attrgetter
from sys import intern


class InlineFields:
    """Pickling of a dataclass field by field, so its instances keep their attributes inline. CPython 3.11's
    default ``__getstate__`` turns an instance's inline attribute values into a ``__dict__`` (and unpickling
    fills one), after which every attribute read and write on it takes the slower dict-based path: the
    recommender's update ~1.2x slower after a worker's first checkpoint, or once resumed from one. The same
    state dict (fields in order), so the same pickle bytes; a field an older pickle lacks takes its default.
    Attribute names are set interned, as Python's own ``setattr`` sets them: the first instance of a class
    fixes the key objects all its instances share, and an unpickled name is a new string."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        annotated = (name for base in reversed(cls.__mro__) for name in base.__dict__.get("__annotations__", ()))
        cls._field_names = tuple(dict.fromkeys(annotated))  # the dataclass's fields (two or more), in its order
        cls._field_values = attrgetter(*cls._field_names)

    def __getstate__(self) -> dict:
        return dict(zip(self._field_names, self._field_values(self)))

    def __setstate__(self, state: dict) -> None:
        deque(map(self.__setattr__, map(intern, state), state.values()), maxlen=0)  # names as the class's own
        if len(state) != len(self.__dataclass_fields__):  # an older pickle: fields it lacks take their defaults
            for name, spec in self.__dataclass_fields__.items():
                if name not in state:
                    setattr(self, name, spec.default if spec.default is not MISSING else spec.default_factory())


__all__ = ["InlineFields"]

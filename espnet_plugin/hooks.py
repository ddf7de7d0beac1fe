"""Watch the calls of one module's method without changing its class: the profiler and the
attention converter see what a model computes while ESPnet runs it as usual."""

import inspect
from contextlib import contextmanager
from typing import Callable


@contextmanager
def intercepted(obj, method: str, callback: Callable[[dict, object], None]):
    """Call ``callback(arguments by name, result)`` after each ``obj.<method>(...)`` inside the
    ``with`` block; the instance gets its class's method back after it."""
    original = getattr(obj, method)
    signature = inspect.signature(original)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        callback(bound.arguments, result)
        return result

    setattr(obj, method, wrapper)
    try:
        yield
    finally:
        delattr(obj, method)

"""Turning Lithops' ``iterdata`` into one keyword dict per call, as ``lithops.utils`` does."""

from __future__ import annotations

import inspect
from collections.abc import Callable

# Parameters the runner fills in by name; iterdata never has to provide them.
RESERVED_PARAMS = ("ibm_cos", "storage", "id", "rabbitmq")


class ChainedFuture:
    """Iterdata element meaning "the output of this future" (``map`` over a FuturesList)."""

    __slots__ = ("future",)

    def __init__(self, future):
        self.future = future


def format_data(iterdata, extra_args) -> list:
    """A list of call inputs, with ``extra_args`` appended to (or merged into) each."""
    from dask_lithops.executor.future import FuturesList

    if isinstance(iterdata, (list, FuturesList)):
        data = iterdata
    elif isinstance(iterdata, (range, set, frozenset)) or hasattr(iterdata, "__next__"):
        data = list(iterdata)  # ranges, sets, generators and other iterators: their items
    else:  # as in Lithops, anything else (a dict, a tuple, an array...) is one call's input
        data = [iterdata]
    if not extra_args:
        return list(data)
    out = []
    for elem in data:
        if isinstance(elem, tuple):
            if not isinstance(extra_args, tuple):
                raise TypeError("extra_args must be a tuple when the iterdata elements are tuples, "
                                f"not {type(extra_args).__name__}")
            out.append(elem + extra_args)
        elif isinstance(elem, dict):
            if not isinstance(extra_args, dict):
                raise TypeError("extra_args must be a dict when the iterdata elements are dicts, "
                                f"not {type(extra_args).__name__}")
            out.append({**elem, **extra_args})
        else:
            if isinstance(extra_args, dict):
                raise TypeError("extra_args must be a tuple or list when the iterdata elements are "
                                "single values, not dict")
            out.append((elem, *extra_args))
    return out


def user_signature(func: Callable) -> inspect.Signature:
    sig = inspect.signature(func)
    return sig.replace(parameters=[p for name, p in sig.parameters.items()
                                   if name not in RESERVED_PARAMS])


def verify_args(func: Callable, iterdata, extra_args) -> list[dict]:
    """One ``{parameter: value}`` dict per call; a bad element fails here, before any call.

    Tuples are positional arguments, dicts keyword arguments, anything else the
    single first argument -- Lithops' rules.
    """
    from dask_lithops.executor.future import FuturesList

    if isinstance(iterdata, FuturesList):
        return [{"__chained__": ChainedFuture(f)} for f in iterdata]
    data = format_data(iterdata, extra_args)
    try:
        sig = user_signature(func)
    except (TypeError, ValueError):  # builtins without a signature: positional arguments as given
        return [{"__args__": e if isinstance(e, tuple) else (e,)} if not isinstance(e, dict) else e
                for e in data]
    params = sig.parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    required = [n for n, p in params.items()
                if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    fname = getattr(func, "__name__", type(func).__name__)
    single = _single_value_param(params)
    out = []
    for i, elem in enumerate(data):
        if single is not None and not isinstance(elem, (tuple, dict)):
            out.append({single: elem})  # what bind() would give, without its cost per call
            continue
        if isinstance(elem, dict):
            missing = [n for n in required if n not in elem]
            unknown = [] if has_var_kw else [k for k in elem if k not in params]
            if missing or unknown:
                raise ValueError(
                    f"iterdata[{i}] = {elem!r} does not match {fname}{sig}: "
                    + (f"missing {missing}" if missing else "")
                    + ("; " if missing and unknown else "")
                    + (f"unknown {unknown}" if unknown else ""))
            out.append(elem)
            continue
        args = elem if isinstance(elem, tuple) else (elem,)
        try:
            out.append(dict(sig.bind(*args).arguments))
        except TypeError as e:
            raise TypeError(f"iterdata[{i}] = {elem!r} does not match {fname}{sig}: {e}") from None
    return out


def _single_value_param(params) -> str | None:
    """The parameter a lone value binds to, when binding it can never fail."""
    items = list(params.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not items or items[0].kind not in positional or items[0].kind is inspect.Parameter.POSITIONAL_ONLY:
        return None
    for p in items[1:]:
        if p.default is inspect.Parameter.empty and p.kind in (
                inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY):
            return None
    return items[0].name


def call_layout(func: Callable) -> tuple | None:
    """How a call's dict maps onto ``func``'s parameters, computed once per job.

    ``(var_positional_name, var_keyword_name, names_before_var_positional,
    positional_only_names)``, or None when ``func`` has no inspectable signature.
    """
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return None
    var_pos = var_kw = None
    before, positional_only = [], []
    for name, p in params.items():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            var_pos = name
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = name
        elif var_pos is None:
            before.append(name)
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                positional_only.append(name)
    return var_pos, var_kw, tuple(before), tuple(positional_only)


def call_arguments(layout: tuple | None, data: dict) -> tuple[tuple, dict]:
    """``*args, **kwargs`` from a call's dict (var-positional/keyword parameters unpacked)."""
    if "__args__" in data:
        return tuple(data["__args__"]), {k: v for k, v in data.items() if k != "__args__"}
    if layout is None:
        return (), dict(data)
    var_pos, var_kw, before, positional_only = layout
    kwargs = dict(data)
    args = tuple(kwargs.pop(var_pos, ()) or ()) if var_pos else ()
    extra = (kwargs.pop(var_kw, None) or {}) if var_kw else {}
    # positional-only parameters (builtins such as sum) go by position, and so do all those
    # before *args when it has values
    lead = []
    for name in before if args else positional_only:
        if name not in kwargs:
            break
        lead.append(kwargs.pop(name))
    args = tuple(lead) + args
    kwargs.update(extra)
    return args, kwargs


def is_object_processing_function(func: Callable) -> bool:
    try:
        return "obj" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False

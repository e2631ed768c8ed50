"""The bounded Jinja sandbox chat templates render in: transformers' environment, with limits on memory and time.

What it does: :func:`compile_template` compiles a template in an immutable sandbox with the environment
transformers builds (trim_blocks, lstrip_blocks, loopcontrols, a no-op ``{% generation %}`` tag,
``raise_exception``, ``strftime_now``, the non-HTML-escaping ``tojson`` filter, guarded ``dict``/``namespace``);
:func:`render_bounded` renders it under a fresh per-thread budget.

Templates are untrusted code from the Hub, so every render is bounded and a violation raises
:class:`TemplateLimitError` (a ``ValueError``) instead of exhausting memory or time:

- the rendered prompt is at most :data:`MAX_OUTPUT_CHARS` characters; everything the template writes, captured
  blocks and macro bodies included, at most :data:`MAX_WRITTEN_CHARS`;
- every value the template builds (strings, lists, dicts, namespaces; by ``+ * % ~``, literals, filters, method
  calls, ``str.format``) holds at most :data:`MAX_VALUE_SIZE` "size units" (characters of text plus 8 per object,
  shared references counted each time, so ``[[x] * 1000] * 1000`` is as large as it prints). Operations whose
  result size follows from their arguments (``'x' * n``, ``|center(n)``, ``'%*d'``, ``{:>{w}}``, ``|indent``,
  ``|replace``, ``|join``, ``|tojson(indent=...)``, ...) are checked *before* they run;
- ``range()`` yields at most :data:`MAX_RANGE` items, integers built by ``*``/``**`` have at most
  :data:`MAX_INT_BITS` bits;
- the render may use :data:`MAX_RENDER_SECONDS` of its thread's CPU time, checked at every loop iteration, call,
  filter and operator, so loops without output and runaway macro recursion stop too (deep recursion stops at
  Python's recursion limit).

These are hooks in the sandbox (``call``, ``call_binop``, ``str.format``), wrappers around every filter, test and
global, and a code generator that routes for-loop iterables, ``~``, literals and writes through the environment;
all per-render state is thread-local, so concurrent renders (Triton worker threads) do not interfere. Every failure
of a render is a :class:`ChatTemplateError` (a ``ValueError``): the template refused the conversation
(:class:`TemplateRejectedError`), hit a bound (:class:`TemplateLimitError`), tried a sandbox escape
(:class:`TemplateSecurityError`, also a ``jinja2.exceptions.SecurityError``) or broke (its ``TypeError`` etc.).

What it does not do: find templates or prepare messages (runtime_py/chat.py does). A namespace prints as
``<Namespace>`` (transformers prints its attributes; printing them would let a later attribute write grow values
already built). Constant folding of filters at compile time is off (filters run at render time, inside the
bounds). Compiling a template is not bounded. A single C-level operation cannot be interrupted: the few whose
time grows faster than their input have their inputs bounded (MAX_HASHED_ITEMS, MAX_STRIP_CHARS, MAX_URLIZE_WORK,
MAX_WORDWRAP_CHARS), the clock is read after every filter and method call and at the end, and one operation on a
value just under a bound can still overrun the budget by about a second before the render fails.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
import types
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache, update_wrapper, wraps

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import _PassArg, generate_lorem_ipsum
from markupsafe import Markup

# -- bounds ----------------------------------------------------------------------------------------------------------
# 4 Mi characters is ~1M tokens: above any context length, far below what hurts (a few tens of MB per value).
MAX_OUTPUT_CHARS = 4 * 2**20  # the rendered prompt
MAX_WRITTEN_CHARS = 4 * MAX_OUTPUT_CHARS  # every write of a render, captured blocks and macro bodies included
MAX_VALUE_SIZE = 4 * 2**20  # any one value a template builds: characters of text + 8 per object (see _size)
MAX_RANGE = 10_000  # items of one range() (Jinja's sandbox allows 100_000; chat templates loop over messages)
MAX_INT_BITS = 8192  # integers built by * and ** (Python refuses to print ints of more than ~14_000 bits anyway)
MAX_RENDER_SECONDS = 2.0  # CPU time of the rendering thread; real templates take about a millisecond
# Inputs of the few operations whose time grows faster than their input (each would run for minutes inside one C or
# library call, where no tick can stop it, on values far below MAX_VALUE_SIZE):
MAX_HASHED_ITEMS = 4096  # items |unique and dict() hash (ints that all hash alike make them quadratic)
MAX_STRIP_CHARS = 256  # the chars argument of |trim and str.strip/lstrip/rstrip (O(len(s) * len(chars)))
MAX_URLIZE_WORK = 2**24  # |urlize: the sum of len(word)**2 over its long words (its punctuation regex backtracks)
MAX_WORDWRAP_CHARS = 65536  # the text |wordwrap takes (textwrap is quadratic on long runs of spaces)
MAX_ERROR_MESSAGE_CHARS = 2000  # raise_exception messages are cut to this
_CLOCK_EVERY = 32  # ticks between CPU clock reads (a read is a ~0.5 us syscall)
_SIZE_CACHE_ENTRIES = 4096
_SIZE_CACHE_MIN = 64  # containers smaller than this are cheaper to re-measure than to cache


class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
    """Rendering a chat template failed: it refused the conversation, hit a bound, tried a sandbox escape or broke."""


class TemplateRejectedError(ChatTemplateError):
    """The template itself refused the conversation (its raise_exception), e.g. 'System role not supported'."""


class TemplateLimitError(ChatTemplateError):
    """The template exceeded a rendering bound (MAX_OUTPUT_CHARS, MAX_VALUE_SIZE, MAX_RENDER_SECONDS, ...)."""


class TemplateSecurityError(ChatTemplateError, jinja2.exceptions.SecurityError):
    """The template tried something the sandbox forbids (e.g. ``''.__class__.__mro__``)."""


# -- per-render accounting (thread-local) ----------------------------------------------------------------------------
class _Render:
    """The budget of one render on one thread."""

    __slots__ = ("deadline", "ticks", "written", "sizes", "error")

    def __init__(self):
        self.deadline = time.thread_time() + MAX_RENDER_SECONDS
        self.ticks = 0
        self.written = 0
        self.sizes: dict[int, tuple[object, int]] = {}  # id -> (the object, kept alive so the id stays its own; size)
        self.error: TemplateLimitError | None = None  # the first violation; sticky even if something swallows it


_local = threading.local()


def _current() -> _Render | None:
    return getattr(_local, "render", None)


def _exceeded(bound: str, what: str) -> TemplateLimitError:
    """The error for a violated bound (by its module constant's name), remembered by the current render."""
    error = TemplateLimitError(f"chat template exceeded {bound} = {globals()[bound]:,}: {what}")
    render = _current()
    if render is not None and render.error is None:
        render.error = error
    return error


def _clock() -> None:
    """After an operation that may have run long in one call (a filter, a method): the CPU budget, read now."""
    render = getattr(_local, "render", None)
    if render is not None and time.thread_time() > render.deadline:
        raise _exceeded("MAX_RENDER_SECONDS", "rendering used more CPU time than that (an operation that took too "
                                              "long)")


def _tick() -> None:
    """One unit of template work: re-raises an earlier violation and enforces the CPU-time budget."""
    render = getattr(_local, "render", None)
    if render is None:
        return
    if render.error is not None:
        raise render.error
    render.ticks += 1
    if render.ticks % _CLOCK_EVERY == 0 and time.thread_time() > render.deadline:
        raise _exceeded("MAX_RENDER_SECONDS", "rendering used more CPU time than that (a loop or recursion that "
                                              "does not end soon enough)")


_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


def _size(value, limit: int = MAX_VALUE_SIZE) -> int:
    """Size units of value: len + 8 for text, 8 per object, a container the sum of its items (a shared item counts
    each time). Stops early: once the count passes `limit` it returns some number > limit."""
    if isinstance(value, (str, bytes, bytearray)):
        return 8 + len(value)
    if isinstance(value, int):
        return 8 + value.bit_length() // 3
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        render = _current()
        if render is not None:
            hit = render.sizes.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
        total = 8
        for item in (value.items() if isinstance(value, dict) else value):
            total += _size(item, limit - total)
            if total > limit:
                return total
        _remember(value, total)
        return total
    if type(value) in _DICT_VIEWS:
        return _size(value.mapping, limit)
    return 8  # None, floats, generators, macros, namespaces (they print as "<Namespace>"), ...


def _remember(value, size: int) -> None:
    """Cache a container's size for this render. Sound because templates cannot mutate lists, tuples or dicts (the
    immutable sandbox) and the cache holds the object, so its id is not reused while cached."""
    render = _current()
    if render is None or size < _SIZE_CACHE_MIN:
        return
    if len(render.sizes) >= _SIZE_CACHE_ENTRIES:
        render.sizes.clear()
    render.sizes[id(value)] = (value, size)


def _held(value, what: str):
    """value, if it is within MAX_VALUE_SIZE."""
    if _size(value) > MAX_VALUE_SIZE:
        raise _exceeded("MAX_VALUE_SIZE", f"{what} would be larger than that")
    return value


def _ensure_fits(estimate: int, what: str) -> None:
    if estimate > MAX_VALUE_SIZE:
        raise _exceeded("MAX_VALUE_SIZE", f"{what} would be larger than that (~{estimate:,})")


def _width(value) -> int:
    """The output width an int or str argument asks for (0 for anything else: the operation decides)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return len(value)
    return 0


def _as_list(value):
    """Materialize a one-shot iterable so it can be measured before use (a sized value is returned as is)."""
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset, range)):
        return value
    try:
        iterator = iter(value)
    except TypeError:
        return value  # not iterable: the filter raises its own error
    items = []
    for item in iterator:
        _tick()
        items.append(item)
    return items


# -- checks before an operation runs ---------------------------------------------------------------------------------
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= 12 else MAX_VALUE_SIZE + 1


def _check_printf(fmt, args, what: str) -> None:
    """fmt % args: each conversion writes at most its width/precision plus the largest argument."""
    if isinstance(fmt, (bytes, bytearray)):
        fmt = fmt.decode("latin-1")
    specs = _PRINTF_SPEC.findall(fmt)
    if not specs:
        return
    if isinstance(args, Mapping):
        values = list(args.values())
    elif isinstance(args, tuple):
        values = list(args)
    else:
        values = [args]
    widest = 0
    for width, precision in specs:
        for part in (width, precision):
            if part == "*":
                widest = max([widest] + [abs(v) for v in values if isinstance(v, int)])
            elif part:
                widest = max(widest, _number(part))
    largest = max((_size(v) for v in values), default=0)
    _ensure_fits(len(fmt) + len(specs) * (largest + widest), what)


def _check_format_spec(spec: str) -> None:
    """'{:>1000000000}': a width or precision past the bound (checked after nested fields are filled in)."""
    for digits in _DIGITS.findall(spec):
        if _number(digits) > MAX_VALUE_SIZE:
            raise _exceeded("MAX_VALUE_SIZE", f"str.format spec {spec[:40]!r} asks for a wider field than that")


def _replace_estimate(s, old, new, count) -> int:
    if not isinstance(s, (str, bytes)) or type(old) is not type(s) or type(new) is not type(s):
        return _size(s)  # the operation raises (or converts) on its own
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * len(new)


def _check_repeat(left, right) -> int | None:
    """seq * n and int * int, before they run; the result's size when it is a sequence."""
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _exceeded("MAX_INT_BITS", "an integer product would have more bits than that")
        return None
    seq, n = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
        size = 8 + (_size(seq) - 8) * max(n, 0)
        _ensure_fits(size, f"a {type(seq).__name__} repeated {n:,} times")
        return size
    return None


def _check_add(left, right) -> int | None:
    if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
        size = _size(left) + _size(right) - 8
        _ensure_fits(size, f"a {type(left).__name__} concatenation (+)")
        return size
    return None


def _check_pow(base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if abs(base).bit_length() * exponent > MAX_INT_BITS:
            raise _exceeded("MAX_INT_BITS", f"{base} ** {exponent} would have more bits than that")


def _check_method(obj, args: tuple, kwargs: dict) -> tuple:
    """Builtin methods whose result size their arguments decide ('x'.center(10**9), sep.join(items), ...).
    Returns args (a one-shot iterable given to join is materialized)."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(obj, types.BuiltinMethodType) or owner is None:
        return args
    name = obj.__name__
    if isinstance(owner, (str, bytes, bytearray)):
        what = f"{type(owner).__name__}.{name}()"
        if name in ("center", "ljust", "rjust", "zfill"):
            _ensure_fits(_width(args[0] if args else kwargs.get("width")), what)
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            tabs = owner.count("\t" if isinstance(owner, str) else b"\t")
            _ensure_fits(len(owner) + tabs * max(_width(tab), 0), what)
        elif name == "replace" and len(args) >= 2:
            _ensure_fits(_replace_estimate(owner, args[0], args[1], args[2] if len(args) > 2 else None), what)
        elif name == "join" and args:
            items = _as_list(args[0])
            n = len(items) if hasattr(items, "__len__") else 0
            _ensure_fits(_size(items) + max(n - 1, 0) * len(owner), what)
            args = (items, *args[1:])
        elif name in ("strip", "lstrip", "rstrip") and args and isinstance(args[0], (str, bytes)):
            _check_strip_chars(args[0], what)
        elif name == "translate" and isinstance(owner, str) and args and isinstance(args[0], Mapping):
            longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
            _ensure_fits(len(owner) * max(longest, 1), what)
    elif isinstance(owner, dict) and name in ("update", "fromkeys"):
        args = _check_hashed(args, kwargs, f"dict.{name}()")
    elif isinstance(owner, int) and name == "to_bytes":
        _ensure_fits(_width(args[0] if args else kwargs.get("length", 1)), "int.to_bytes()")
    return args


def _check_strip_chars(chars, what: str) -> None:
    if len(chars) > MAX_STRIP_CHARS:
        raise _exceeded("MAX_STRIP_CHARS", f"{what} was given {len(chars):,} characters to strip")


def _check_hashed(args: tuple, kwargs: dict, what: str) -> tuple:
    """dict(...), dict.update/fromkeys: at most MAX_HASHED_ITEMS items to hash (a one-shot iterable materialized)."""
    args = tuple(_as_list(a) if not isinstance(a, Mapping) else a for a in args)
    n = sum(len(a) for a in args if hasattr(a, "__len__")) + len(kwargs)
    if n > MAX_HASHED_ITEMS:
        raise _exceeded("MAX_HASHED_ITEMS", f"{what} was given {n:,} items")
    return args


def _layout_size(value, level_indent, per_item: int) -> int:
    """An upper bound on the characters of an indented dump (tojson with indent, pprint): every item sits on its
    own line behind its depth's indentation. Stops past MAX_VALUE_SIZE."""
    total, stack = 0, [(value, 0)]
    while stack:
        item, indent = stack.pop()
        total += indent + per_item + (_size(item) if isinstance(item, (str, bytes, int)) else 8)
        if total > MAX_VALUE_SIZE:
            return total
        if isinstance(item, Mapping):
            for key, child in item.items():
                step = level_indent(key)
                total += _size(key)
                stack.append((child, indent + step))
        elif isinstance(item, (list, tuple, set, frozenset)):
            step = level_indent(None)
            stack.extend((child, indent + step) for child in item)
        if len(stack) > MAX_VALUE_SIZE // 8:
            return MAX_VALUE_SIZE + 1
    return total


def _pprint_indent(key) -> int:
    return 1 if key is None else len(repr(key)) + 2  # pprint indents a dict's values behind "key: "


# Filter checks by name: each gets the filter's bound arguments (name -> value) and may replace a one-shot iterable.
def _filter_center(a):
    _ensure_fits(_width(a["width"]), "|center")


def _filter_indent(a):
    s = str(a["s"])
    _ensure_fits(len(s) + (s.count("\n") + 1) * max(_width(a["width"]), 0), "|indent")


def _filter_wordwrap(a):
    s, wrap = str(a["s"]), a["wrapstring"]
    if len(s) > MAX_WORDWRAP_CHARS:
        raise _exceeded("MAX_WORDWRAP_CHARS", f"|wordwrap was given {len(s):,} characters")
    _ensure_fits(len(s) * (1 + (len(wrap) if isinstance(wrap, str) else 1)), "|wordwrap")


def _filter_trim(a):
    if isinstance(a["chars"], str):
        _check_strip_chars(a["chars"], "|trim")


def _filter_unique(a):
    a["value"] = items = _as_list(a["value"])
    if hasattr(items, "__len__") and len(items) > MAX_HASHED_ITEMS:
        raise _exceeded("MAX_HASHED_ITEMS", f"|unique was given {len(items):,} items")


def _filter_replace(a):
    _ensure_fits(_replace_estimate(str(a["s"]), str(a["old"]), str(a["new"]), a["count"]), "|replace")


def _filter_join(a):
    a["value"] = items = _as_list(a["value"])
    n = len(items) if hasattr(items, "__len__") else 0
    _ensure_fits(_size(items) + max(n - 1, 0) * _size(a["d"]), "|join")


def _filter_format(a):
    _check_printf(str(a["value"]), a["kwargs"] or a["args"], "|format")


def _filter_batch(a):
    if a["fill_with"] is not None:
        _ensure_fits(max(_width(a["linecount"]), 0) * _size(a["fill_with"]), "|batch with fill_with")


def _filter_slice(a):
    _ensure_fits(max(_width(a["slices"]), 0) * (8 + _size(a["fill_with"])), "|slice")


def _filter_sum(a):
    a["iterable"] = items = _as_list(a["iterable"])
    size = _size(items) + _size(a["start"])
    _ensure_fits(size, "|sum")
    if not isinstance(a["start"], (int, float)) and hasattr(items, "__len__"):
        _ensure_fits(len(items) * size // 16, "|sum of sequences (quadratic concatenation)")


def _filter_pprint(a):
    _ensure_fits(_layout_size(a["value"], _pprint_indent, 2), "|pprint")


def _filter_tojson(a):
    indent, separators = a["indent"], a["separators"]
    step = max(_width(indent), 0) if indent is not None else 0
    per_item = 4 + (sum(len(str(s)) for s in separators) if isinstance(separators, (tuple, list)) else 0)
    _ensure_fits(_layout_size(a["x"], lambda key: step, per_item), "|tojson")


def _filter_urlize(a):
    s = str(a["value"])
    work = sum(n * n for n in map(len, s.split()) if n > 64)  # short words cost their length; long ones its square
    if work > MAX_URLIZE_WORK:
        raise _exceeded("MAX_URLIZE_WORK", f"|urlize was given words of {work:,} squared characters")
    extra = 48 + sum(len(str(a[k])) for k in ("target", "rel") if a[k] is not None)
    _ensure_fits(3 * len(s) + (len(s) // 4 + 1) * extra, "|urlize")


# Filters that turn a string into a list of its characters (or words) before working on it: a 4M-character string
# was a list of 4M str objects, ~50 bytes each, and one C-level sort of it ran 2 s past MAX_RENDER_SECONDS.
_ITEMIZING = frozenset({"sort", "batch", "slice", "list", "unique", "join", "map", "select", "reject", "selectattr",
                        "rejectattr", "groupby", "title", "wordcount", "sum"})

_FILTER_CHECKS = {
    "center": _filter_center, "indent": _filter_indent, "wordwrap": _filter_wordwrap, "replace": _filter_replace,
    "join": _filter_join, "format": _filter_format, "batch": _filter_batch, "slice": _filter_slice,
    "sum": _filter_sum, "pprint": _filter_pprint, "tojson": _filter_tojson, "urlize": _filter_urlize,
    "trim": _filter_trim, "unique": _filter_unique,
}


def _bounded_filter(name: str, func):
    """func, ticking, with its size check (if any) before and MAX_VALUE_SIZE on its result after. Marked
    pass_context so Jinja never runs it at compile time (constant folding), outside the render's bounds."""
    pass_arg = _PassArg.from_obj(func)
    check = _FILTER_CHECKS.get(name)
    signature = None
    if check is not None:
        # The parameters after the context/eval_ctx/environment one. Jinja's async-capable filters are wrappers
        # whose signature (via __wrapped__) is the sync function's, which may not take that first parameter.
        target = inspect.unwrap(func)
        signature = inspect.signature(target)
        if _PassArg.from_obj(target) is not None:
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])

    @jinja2.pass_context
    def bounded(context, *args, **kwargs):
        _tick()
        if name in _ITEMIZING and args and isinstance(args[0], str):  # one Python object an item, before it is built
            _ensure_fits(9 * len(args[0]), f"|{name} of a string of {len(args[0]):,} characters (an item a "
                                           "character or word)")
        if check is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(bound.arguments)
            args, kwargs = bound.args, bound.kwargs
        if pass_arg is _PassArg.context:
            args = (context, *args)
        elif pass_arg is _PassArg.eval_context:
            args = (context.eval_ctx, *args)
        elif pass_arg is _PassArg.environment:
            args = (context.environment, *args)
        result = func(*args, **kwargs)
        _clock()
        return _held(result, f"the result of |{name}")

    bounded.__name__ = bounded.__qualname__ = f"bounded_{name}"
    return bounded


def _ticking(func):
    """A test or global that counts as template work (its jinja pass-arg marker is kept by wraps)."""
    @wraps(func)
    def ticking(*args, **kwargs):
        _tick()
        return func(*args, **kwargs)

    return ticking


# -- environment -----------------------------------------------------------------------------------------------------
def _raise_exception(message):
    raise TemplateRejectedError(f"chat template rejected the conversation: {str(message)[:MAX_ERROR_MESSAGE_CHARS]}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: Jinja's own tojson HTML-escapes '<', '>', '&' and "'" and sorts keys.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    if len(str(format)) > MAX_VALUE_SIZE // 256:  # C strftime may write up to 256 characters per format character
        raise _exceeded("MAX_VALUE_SIZE", "the strftime_now format is too long (more than 1/256 of that)")
    return datetime.now().strftime(format)


def _range(*args):
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise _exceeded("MAX_RANGE", f"range{args} has more items than that")
    return r


def _lipsum(n=5, html=True, min=20, max=100):
    _ensure_fits(_width(n) * _width(max) * 16, "lipsum()")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class _TemplateDict:
    """`dict` for templates without exposing the dict type itself (no attribute walks from it)."""

    def __call__(self, *args, **kwargs):
        return dict(*_check_hashed(args, kwargs, "dict()"), **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*_check_hashed(args[:1], {}, "dict.fromkeys()"), *args[1:], **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed names (no dunder access through it) and holding at most
    MAX_VALUE_SIZE in all. Prints as ``<Namespace>``: a container holding it then cannot grow by later writes."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        _ensure_fits(sum(_size(v) for v in attrs.values()), "a namespace")
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        _tick()
        attrs = object.__getattribute__(self, "_Namespace__attrs")
        others = sum(_size(v) for k, v in attrs.items() if k != name)
        _ensure_fits(others + _size(value), f"namespace attribute {str(name)[:40]!r} (the namespace in all)")
        jinja2.utils.Namespace.__setitem__(self, name, value)

    def __repr__(self):
        return "<Namespace>"

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed namespace "
                                                  f"attributes, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _BoundedFormatting:
    """str.format within MAX_VALUE_SIZE: field widths checked before formatting, the output counted as it grows."""

    def vformat(self, format_string, args, kwargs):
        self.produced = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def get_field(self, field_name, args, kwargs):
        obj, first = super().get_field(field_name, args, kwargs)
        _held(obj, "a str.format field")  # before !r / format() turn it into text
        return obj, first

    def format_field(self, value, format_spec):
        _check_format_spec(format_spec)
        text = super().format_field(value, format_spec)
        self.produced += len(text)
        _ensure_fits(self.produced, "the result of str.format")
        return text


class _BoundedFormatter(_BoundedFormatting, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_BoundedFormatting, SandboxedEscapeFormatter):
    pass


class _TickingIterable:
    """Iterates like the wrapped iterable (same len() when it has one), one tick per item."""

    __slots__ = ("iterable",)

    def __init__(self, iterable):
        self.iterable = iterable

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        for item in self.iterable:
            _tick()
            yield item


def _is_bounded_iter(node) -> bool:
    return isinstance(node, jinja2.nodes.Call) and isinstance(node.node, jinja2.nodes.EnvironmentAttribute) and \
        node.node.name == "bounded_iter"


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, routing what the sandbox does not see through the environment: for-loop iterables
    (bounded_iter), ``~`` (bounded_concat), list/tuple/dict literals (held) and every write (written)."""

    def visit_For(self, node, frame):
        if not _is_bounded_iter(node.iter):  # for x in environment.bounded_iter(<iterable>)
            node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None,
                                          None, lineno=node.iter.lineno)
        super().visit_For(node, frame)

    @optimizeconst
    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile:  # the same markup choice as CodeGenerator.visit_Concat
            markup = "context.eval_ctx.volatile"
        else:
            markup = "True" if frame.eval_ctx.autoescape else "False"
        self.write(f"environment.bounded_concat({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_List(self, node, frame):
        self.write("environment.held(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node, frame):
        self.write("environment.held(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node, frame):
        if node.ctx != "load":  # an assignment target: (a, b) = ...
            return super().visit_Tuple(node, frame)
        self.write("environment.held(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def start_write(self, frame, node=None):  # call blocks, filter blocks, recursive loops
        super().start_write(frame, node)
        self.write("environment.written(")

    def end_write(self, frame):
        self.write(")")
        super().end_write(frame)

    def _output_const_repr(self, group):  # template text
        return f"environment.written({super()._output_const_repr(group)})"


def _written(text):
    """Count text toward MAX_WRITTEN_CHARS (outside a render, e.g. compile-time folding: nothing to count)."""
    render = getattr(_local, "render", None)
    if render is not None:
        _tick()
        render.written += len(text)
        if render.written > MAX_WRITTEN_CHARS:
            raise _exceeded("MAX_WRITTEN_CHARS", "the template wrote more characters than that (captured blocks and "
                                                 "macro output included)")
    return text


def _finalize(value):
    """Every {{ expression }} on its way out: measured before it is turned into text, then counted."""
    if not isinstance(value, str):
        value = str(_held(value, "a value written with {{ }}"))
    return _written(value)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the bounds of this module (see the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options):
        super().__init__(finalize=_finalize, **options)
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _ticking(f) for name, f in self.tests.items()}
        self.globals.update(range=_range, lipsum=_lipsum, raise_exception=_raise_exception,
                            strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace)

    def call_binop(self, context, operator, left, right):
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, made quick (no tick:
            if len(left) + len(right) > MAX_VALUE_SIZE:  # loops and calls tick, a run of + is as long as the source)
                raise _exceeded("MAX_VALUE_SIZE", "a str concatenation (+) would be larger than that")
            return left + right
        _tick()
        size = None
        if operator == "*":
            size = _check_repeat(left, right)
        elif operator == "+":
            size = _check_add(left, right)
        elif operator == "**":
            _check_pow(left, right)
        elif operator == "%" and isinstance(left, (str, bytes, bytearray)):
            _check_printf(left, right, "a % format")
        result = self.binop_table[operator](left, right)
        if size is not None and isinstance(result, (list, tuple)):
            _remember(result, size)
        return _held(result, f"the result of {operator}")

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        args = _check_method(obj, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        _clock()
        if _size(result) > MAX_VALUE_SIZE:
            name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
            raise _exceeded("MAX_VALUE_SIZE", f"the result of {str(name)[:60]}() would be larger than that")
        return result

    def wrap_str_format(self, value):
        """Jinja's sandboxed str.format / format_map, with _BoundedFormatting."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                value.__name__ not in ("format", "format_map"):
            return None
        f_self = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type = type(f_self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args, **kwargs):
            _tick()
            if isinstance(f_self, Markup):
                formatter = _BoundedEscapeFormatter(self, escape=f_self.escape)
            else:
                formatter = _BoundedFormatter(self)
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            return str_type(formatter.vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)

    # -- called by the generated code (_BoundedCodeGenerator) --
    def bounded_iter(self, iterable):
        return _TickingIterable(iterable)

    def bounded_concat(self, markup, parts):
        _tick()
        total = 0
        for part in parts:
            total += len(part) if isinstance(part, str) else _size(part, MAX_VALUE_SIZE - total)
            _ensure_fits(total, "a ~ concatenation")
        return _held((markup_join if markup else str_join)(parts), "a ~ concatenation")

    def held(self, value):
        _tick()
        return _held(value, f"a {type(value).__name__} literal")

    def written(self, text):
        return _written(text)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - e.g. RecursionError on absurd nesting
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from None


def render_bounded(compiled: jinja2.Template, variables: dict) -> str:
    """compiled rendered with variables under a fresh budget; every failure a ChatTemplateError."""
    render, outer = _Render(), _current()
    _local.render = render
    stream = compiled.generate(**variables)
    try:
        chunks, n = [], 0
        for chunk in stream:
            n += len(chunk)
            if n > MAX_OUTPUT_CHARS:
                raise _exceeded("MAX_OUTPUT_CHARS", "the rendered prompt would be longer than that")
            chunks.append(chunk)
        if render.error is not None:  # a violation something inside swallowed
            raise render.error
        _clock()  # a last operation that overran the budget does not make the render a success
        return "".join(chunks)
    except Exception as e:  # noqa: BLE001 - every failure of untrusted template code becomes a ChatTemplateError
        if render.error is not None:
            error = render.error
        elif isinstance(e, ChatTemplateError):
            raise
        elif isinstance(e, jinja2.exceptions.SecurityError):
            error = TemplateSecurityError(str(e))
        elif isinstance(e, RecursionError):
            error = TemplateLimitError("chat template calls nested too deeply (Python's recursion limit)")
        else:
            error = ChatTemplateError(f"chat template failed: {type(e).__name__}: {str(e)[:MAX_ERROR_MESSAGE_CHARS]}")
        if error is e:
            raise
        raise error from e
    finally:
        stream.close()
        _local.render = outer

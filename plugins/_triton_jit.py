"""The Triton plumbing the plugin kernels share (private to plugins/): jit-wrapping plain kernel functions on first
launch, and whether kernels run in Triton's CPU interpreter.

What it does: :func:`jit_namespace` copies a plugin module's globals, binds ``tl``/``constexpr`` to
``triton.language`` in the copy and wraps the named kernels with ``triton.jit`` in the interpreter mode Triton's
own library functions were wrapped in; :func:`interpreting` says which mode that is (fixed process-wide when triton
is first imported, from ``TRITON_INTERPRET=1``); :func:`check_device` refuses CPU tensors outside the interpreter.

Importing this module needs neither torch nor triton (graphs/ and runtime_py import the plugin modules for their
constants); every function imports triton when called.

What it does not do: define kernels (plugins/attention.py, plugins/moe.py) or choose launch configurations.
"""


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter. Triton fixes this when it is first imported, from
    ``TRITON_INTERPRET=1`` (its own jit'd library functions are wrapped at import), so it is process-wide."""
    from triton import knobs
    from triton.runtime.jit import JITFunction
    import triton.language as language

    return bool(knobs.runtime.interpret) and not isinstance(language.zeros, JITFunction)


def jit_namespace(module_globals: dict, names, what: str):
    """The kernels ``names`` of a module (its ``globals()``), jit-wrapped in a copy of its namespace where ``tl``,
    ``constexpr`` and the kernels' names mean the jitted objects (the module's own functions stay plain). ``what``
    names the kernels in the error when triton is missing."""
    import types

    try:
        import triton
        import triton.language as language
        from triton import knobs
    except ImportError as e:
        raise ImportError(f"the {what} kernels need triton (pip install triton; without a GPU set "
                          "TRITON_INTERPRET=1 before triton is imported to run them in its CPU interpreter)") from e
    ns = dict(module_globals, tl=language, constexpr=language.constexpr)
    for name in names:
        raw = module_globals[name]
        fn = types.FunctionType(raw.__code__, ns, raw.__name__, raw.__defaults__, raw.__closure__)
        fn.__annotations__, fn.__module__, fn.__qualname__, fn.__doc__ = (
            dict(raw.__annotations__), raw.__module__, raw.__qualname__, raw.__doc__)
        with knobs.runtime.scope():  # wrap in the mode triton's own library functions were wrapped in
            knobs.runtime.interpret = interpreting()
            ns[name] = triton.jit(fn)
    return types.SimpleNamespace(**{name: ns[name] for name in names})


def check_device(device) -> bool:
    """Returns whether kernels run interpreted; CPU tensors need the interpreter."""
    interpret = interpreting()
    if device.type == "cpu" and not interpret:
        raise RuntimeError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported")
    return interpret

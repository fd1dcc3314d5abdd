"""The public API matches the reference of hivemind 1.1.12 name by name (no network, no daemons).

Every callable in tests/api_conformance_table.py is compared with ``inspect.signature``: the documented
parameters must appear in the documented order with the same kind (positional / keyword-only / ``*args`` /
``**kwargs``) and the same defaults; extra parameters of ours are allowed only where they cannot break a documented
call (they have defaults and come after the documented positional ones). Also checked: markers (coroutine,
classmethod, staticmethod, property), re-exports, constants, and a few documented behaviours that need no peer.
Running this file as a script prints every mismatch instead of stopping at the first.
"""

import ast
import importlib
import inspect
import logging

import torch
from api_conformance_table import ALLOWED, EXPORTS, NAMES, PROPERTIES, SAME, SETTABLE, SIGNATURES, VALUES

ANY_DEFAULT = object()  # a default written as ``...``: any default will do
EMPTY = inspect.Parameter.empty
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def resolve(dotted: str):
    """The object at ``dotted``, looked up statically on classes (so descriptors come back as themselves)."""
    parts = dotted.split(".")
    obj, index = importlib.import_module(parts[0]), 1
    while index < len(parts):
        try:
            obj, index = importlib.import_module(".".join(parts[: index + 1])), index + 1
            continue
        except ImportError:
            pass
        name = parts[index]
        obj = inspect.getattr_static(obj, name) if inspect.isclass(obj) else getattr(obj, name)
        index += 1
    return obj


def _default_namespace() -> dict:
    from hivemind.compression import NoCompression, TensorRole
    from hivemind.proto.runtime_pb2 import CompressionType

    return dict(
        torch=torch,
        logging=logging,
        NoCompression=NoCompression,
        TensorRole=TensorRole,
        CompressionType=CompressionType,
        DEFAULT_NUM_WORKERS=4,
    )


def parse_line(line: str):
    """(markers, dotted path, expected parameters or None for "not checked")."""
    head, _, params = line.partition("(")
    *markers, dotted = head.split()
    if params.strip() == "...)":
        return set(markers), dotted, None
    tree = ast.parse(f"def f({params}: pass").body[0].args
    namespace = _default_namespace()

    def value(node):
        if isinstance(node, ast.Constant) and node.value is Ellipsis:
            return ANY_DEFAULT
        return eval(compile(ast.Expression(node), "<spec>", "eval"), namespace)

    expected = []
    positional = tree.posonlyargs + tree.args
    defaults = [EMPTY] * (len(positional) - len(tree.defaults)) + [value(d) for d in tree.defaults]
    expected += [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, d) for a, d in zip(positional, defaults)]
    if tree.vararg:
        expected.append((tree.vararg.arg, inspect.Parameter.VAR_POSITIONAL, EMPTY))
    for a, d in zip(tree.kwonlyargs, tree.kw_defaults):
        expected.append((a.arg, inspect.Parameter.KEYWORD_ONLY, EMPTY if d is None else value(d)))
    if tree.kwarg:
        expected.append((tree.kwarg.arg, inspect.Parameter.VAR_KEYWORD, EMPTY))
    return set(markers), dotted, expected


def _defaults_match(expected, actual) -> bool:
    from hivemind.compression import CompressionBase

    if expected is ANY_DEFAULT:
        return actual is not EMPTY
    if isinstance(expected, CompressionBase):
        return type(actual) is type(expected)
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):  # 3 and 3.0 are the same default
        return isinstance(actual, (int, float)) and not isinstance(actual, bool) and expected == actual
    return type(expected) is type(actual) and expected == actual


def callable_problems(line: str) -> list:
    markers, dotted, expected = parse_line(line)
    try:
        obj = resolve(dotted)
    except (AttributeError, ImportError) as e:
        return [f"{dotted}: does not resolve ({e})"]
    problems, bound = [], False
    if inspect.isclass(obj):
        function, bound = obj, True
    elif isinstance(obj, (classmethod, staticmethod)):
        kind = "classmethod" if isinstance(obj, classmethod) else "staticmethod"
        if kind not in markers:
            problems.append(f"{dotted}: is a {kind}, documented as a plain method")
        function, bound = obj.__func__, isinstance(obj, classmethod)
    else:
        function = obj
        for kind in {"classmethod", "staticmethod"} & markers:
            problems.append(f"{dotted}: documented as a {kind}, is {type(obj).__name__}")
        owner = resolve(dotted.rsplit(".", 1)[0])
        bound = inspect.isclass(owner) and not isinstance(obj, staticmethod)
    if "async" in markers and not inspect.iscoroutinefunction(function):
        problems.append(f"{dotted}: documented as a coroutine function, is not one")
    if "asyncgen" in markers and not inspect.isasyncgenfunction(function):
        problems.append(f"{dotted}: documented as an async generator function, is not one")
    if "async" not in markers and not inspect.isclass(obj) and inspect.iscoroutinefunction(function):
        problems.append(f"{dotted}: is a coroutine function, documented as a plain one")
    if expected is None:
        return problems
    try:
        actual = list(inspect.signature(function).parameters.values())
    except ValueError:  # a builtin without a signature (get_dht_time is time.time)
        return problems + ([f"{dotted}: has no inspectable signature"] if expected else [])
    if bound and not inspect.isclass(obj):
        actual = actual[1:]  # self / cls
    if "positional" in markers:  # the reference names these informally (``set_result(x)``): match by position
        actual_positional = [p.name for p in actual if p.kind in POSITIONAL]
        expected = [
            (actual_positional[i] if kind in POSITIONAL and i < len(actual_positional) else name, kind, default)
            for i, (name, kind, default) in enumerate(expected)
        ]
    by_name = {p.name: p for p in actual}
    order = [p.name for p in actual]
    for name, kind, default in expected:
        if kind == inspect.Parameter.VAR_POSITIONAL:
            if not any(p.kind == kind for p in actual):
                problems.append(f"{dotted}: takes no *{name}")
            continue
        if kind == inspect.Parameter.VAR_KEYWORD:
            if not any(p.kind == kind for p in actual):
                problems.append(f"{dotted}: takes no **{name}")
            continue
        if name not in by_name:
            problems.append(f"{dotted}: no parameter {name!r} (has {order})")
            continue
        param = by_name[name]
        if (kind in POSITIONAL) != (param.kind in POSITIONAL):
            problems.append(f"{dotted}: {name!r} is {param.kind.description}, documented as {kind.description}")
        if default is EMPTY and param.default is not EMPTY:
            problems.append(f"{dotted}: {name!r} has default {param.default!r}, documented as required")
        elif default is not EMPTY and not _defaults_match(default, param.default):
            shown = "any" if default is ANY_DEFAULT else repr(default)
            problems.append(f"{dotted}: {name!r} defaults to {param.default!r}, documented as {shown}")
    documented = [
        name
        for name, kind, _ in expected
        if kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    documented_positional = [name for name, kind, _ in expected if kind in POSITIONAL and name in by_name]
    present = [name for name in order if name in documented_positional]
    if present != documented_positional:  # the order of keyword-only parameters does not matter to a caller
        problems.append(f"{dotted}: positional parameters in order {present}, documented as {documented_positional}")
    last_documented_positional = max(
        (order.index(name) for name, kind, _ in expected if kind in POSITIONAL and name in by_name), default=-1
    )
    for index, param in enumerate(actual):
        if param.name in documented or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is EMPTY:
            problems.append(f"{dotted}: extra required parameter {param.name!r}")
        elif param.kind in POSITIONAL and index < last_documented_positional:
            problems.append(f"{dotted}: extra parameter {param.name!r} shifts documented positional ones")
    return problems


def signature_lines():
    return [line for line in SIGNATURES.replace("\\\n", "").splitlines() if line.strip()]


def all_problems() -> list:
    problems = []
    for line in signature_lines():
        problems += callable_problems(line)
    for dotted in PROPERTIES.split():
        try:
            obj = resolve(dotted)
        except AttributeError as e:
            problems.append(f"{dotted}: does not resolve ({e})")
            continue
        if not isinstance(obj, property) and not hasattr(obj, "__get__") or inspect.isfunction(obj):
            problems.append(f"{dotted}: documented as a property, is {type(obj).__name__}")
        elif dotted in SETTABLE.split() and getattr(obj, "fset", None) is None:
            problems.append(f"{dotted}: documented as settable, has no setter")
    for dotted in NAMES.split():
        try:
            resolve(dotted)
        except (AttributeError, ImportError) as e:
            problems.append(f"{dotted}: does not resolve ({e})")
    for dotted, expected in VALUES.items():
        try:
            actual = resolve(dotted)
        except (AttributeError, ImportError) as e:
            problems.append(f"{dotted}: does not resolve ({e})")
            continue
        if actual != expected:
            problems.append(f"{dotted}: is {actual!r}, documented as {expected!r}")
    for dotted, source in SAME.items():
        try:
            if resolve(dotted) is not resolve(source):
                problems.append(f"{dotted}: is not the same object as {source}")
        except (AttributeError, ImportError) as e:
            problems.append(f"{dotted} / {source}: does not resolve ({e})")
    for package, names in EXPORTS.items():
        module = importlib.import_module(package)
        for name in names.split():
            if not hasattr(module, name):
                problems.append(f"{package}: does not export {name}")
    return [problem for problem in problems if problem not in ALLOWED]


def test_checker_reports_a_renamed_a_reordered_and_a_defaulted_parameter():
    line = "hivemind.utils.networking.choose_ip_address(maddrs, prefer_global=False, protocol_priority=('ip4', 'ip6'))"
    assert callable_problems(line) == [
        "hivemind.utils.networking.choose_ip_address: 'prefer_global' defaults to True, documented as False"
    ]
    assert "no parameter 'x'" in callable_problems("hivemind.utils.get_logger(x=None)")[0]
    assert "in order" in callable_problems("hivemind.utils.PerformanceEMA(eps=1e-20, alpha=0.1, paused=False)")[0]
    assert "keyword-only" in callable_problems("hivemind.utils.MPFuture(use_lock=True)")[0]
    assert "coroutine" in callable_problems("async hivemind.utils.get_dht_time()")[0]


def test_every_documented_name_signature_and_constant_matches():
    problems = all_problems()
    assert not problems, "API mismatches:\n" + "\n".join(problems)


if __name__ == "__main__":
    print("\n".join(all_problems()) or "no mismatches")

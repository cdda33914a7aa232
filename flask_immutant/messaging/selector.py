"""Selectors: which messages a listener takes, decided on the message's ``properties``.

A selector is either a callable ``(properties: dict) -> bool`` or a string in a small
expression language (a safe subset of Python expressions, parsed once):

- names are property names; a missing property is ``None``
- literals: strings, numbers, ``True``, ``False``, ``None``, tuples and lists of literals
- comparisons ``== != < <= > >= in not in`` (chainable), ``and``, ``or``, ``not``, parentheses

``"priority >= 5 and region in ('eu', 'us')"``. A comparison that cannot be made (``None < 3``)
is false. Anything else (calls, attributes, subscripts...) is rejected when the listener is
created.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

from .errors import MessagingError

Selector = Callable[[Mapping[str, Any]], bool]

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def compile_selector(selector: str | Selector | None) -> Selector | None:
    """A predicate on properties, or ``None`` for "every message"."""
    if selector is None or callable(selector):
        return selector
    if not isinstance(selector, str):
        raise MessagingError(f"selector must be a string expression or a callable, not {type(selector).__name__}")
    try:
        tree = ast.parse(selector, mode="eval")
    except SyntaxError as exc:
        raise MessagingError(f"selector {selector!r} is not a valid expression: {exc.msg}") from None
    evaluate = _compile(tree.body, selector)
    return lambda properties: bool(evaluate(properties))


def _compile(node: ast.AST, source: str) -> Callable[[Mapping[str, Any]], Any]:
    if isinstance(node, ast.Constant):
        value = node.value
        return lambda p: value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_compile(item, source) for item in node.elts]
        return lambda p: tuple(item(p) for item in items)
    if isinstance(node, ast.Name):
        name = node.id
        return lambda p: p.get(name)
    if isinstance(node, ast.BoolOp):
        values = [_compile(v, source) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda p: all(v(p) for v in values)
        return lambda p: any(v(p) for v in values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        operand = _compile(node.operand, source)
        return lambda p: not operand(p)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        literal = node.operand.value
        if not isinstance(literal, (int, float)):
            raise MessagingError(f"selector {source!r}: only a number can be negated, not {literal!r}")
        negated = -literal
        return lambda p: negated
    if isinstance(node, ast.Compare):
        left = _compile(node.left, source)
        ops = [_COMPARE[type(op)] for op in node.ops if type(op) in _COMPARE]
        if len(ops) != len(node.ops):
            raise MessagingError(f"selector {source!r}: 'is' comparisons are not supported; use == or !=")
        rights = [_compile(c, source) for c in node.comparators]

        def compare(p: Mapping[str, Any]) -> bool:
            current = left(p)
            for op, right in zip(ops, rights, strict=True):
                other = right(p)
                try:
                    if not op(current, other):
                        return False
                except TypeError:
                    return False
                current = other
            return True

        return compare
    raise MessagingError(
        f"selector {source!r}: {type(node).__name__} is not allowed; use property names, literals, "
        "comparisons, and/or/not"
    )

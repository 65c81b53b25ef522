"""A multi grader's `calculate_output`: arithmetic over its sub-graders' names, parsed with `ast` and evaluated
by walking a whitelist of nodes (numbers, names, + - * /, unary signs, min/max/abs): never `eval`."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
FUNCTIONS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}
MAX_LENGTH = 1000


class FormulaError(ValueError):
    pass


def parse_formula(text: str, names: set[str]) -> ast.expr:
    """The formula's tree; FormulaError saying what is wrong when it uses anything but the whitelist or a name
    outside `names`."""
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"must be at most {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise FormulaError(f"not a formula: {exc.msg}") from None
    for node in ast.walk(tree):
        _allow(node, names)
    return tree


def _allow(node: ast.AST, names: set[str]) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise FormulaError(f"{node.value!r}: only numbers and grader names may appear")
    elif isinstance(node, ast.Name):
        if node.id not in names and node.id not in FUNCTIONS:
            raise FormulaError(f"{node.id!r} is not one of the graders ({', '.join(sorted(names))})")
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords or not node.args:
            raise FormulaError(f"only {', '.join(FUNCTIONS)} may be called, with one or more arguments")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in BINARY:
            raise FormulaError("only + - * / combine values")
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in UNARY:
            raise FormulaError("only + and - may sign a value")
    elif not isinstance(node, ast.Load | ast.operator | ast.unaryop):
        raise FormulaError(f"{type(node).__name__} is not allowed: use numbers, grader names, + - * / and min/max/abs")


def evaluate(tree: ast.expr, values: dict[str, float]) -> float:
    """The formula's value for these sub-grader scores; NaN where it divides by zero."""
    if isinstance(tree, ast.Constant) and isinstance(tree.value, int | float):
        return float(tree.value)
    if isinstance(tree, ast.Name):
        return values[tree.id]
    if isinstance(tree, ast.UnaryOp):
        return UNARY[type(tree.op)](evaluate(tree.operand, values))
    if isinstance(tree, ast.Call):
        assert isinstance(tree.func, ast.Name)
        return float(FUNCTIONS[tree.func.id](*(evaluate(arg, values) for arg in tree.args)))
    assert isinstance(tree, ast.BinOp)
    left, right = evaluate(tree.left, values), evaluate(tree.right, values)
    if isinstance(tree.op, ast.Div) and right == 0:
        return math.nan
    return BINARY[type(tree.op)](left, right)

"""The ``calculator`` tool: exact arithmetic on an expression, parsed with ``ast`` (nothing is ``eval``-ed).

Numbers are exact fractions (``0.1 + 0.2`` is ``0.3``, ``1/3*3`` is ``1``); ``+ - * / // % **``, parentheses, unary
signs and the functions ``sqrt abs round min max floor ceil`` are allowed. A non-integer power or ``sqrt`` of a
non-square falls back to floating point. Anything else (names, attributes, strings, calls of other functions) is
refused with a ``ValueError`` saying so; sizes are bounded so that ``9**9**9`` is refused instead of hanging.
"""

from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction

MAX_EXPRESSION_CHARS = 300
MAX_EXPONENT = 512
MAX_DIGITS = 400

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
Number = Fraction | float


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise ValueError("sqrt of a negative number")
    if isinstance(x, Fraction):
        n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if n * n == x.numerator and d * d == x.denominator:
            return Fraction(n, d)
    return math.sqrt(x)


_FUNCTIONS = {
    "sqrt": _sqrt,
    "abs": abs,
    "round": lambda x, n=0: Fraction(round(Fraction(x), int(n))),
    "min": min,
    "max": max,
    "floor": lambda x: Fraction(math.floor(x)),
    "ceil": lambda x: Fraction(math.ceil(x)),
}


def _check_size(x: Number) -> Number:
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError("result is not a finite number")
    if isinstance(x, Fraction) and max(abs(x.numerator), x.denominator).bit_length() > MAX_DIGITS * 3.33:
        raise ValueError(f"number too large (over {MAX_DIGITS} digits)")
    return x


def _power(base: Number, exp: Number) -> Number:
    if isinstance(exp, Fraction) and exp.denominator == 1 and isinstance(base, Fraction):
        if abs(exp) > MAX_EXPONENT:
            raise ValueError(f"exponent too large (limit {MAX_EXPONENT})")
        if base == 0 and exp < 0:
            raise ValueError("division by zero")
        return base**exp.numerator
    return float(base) ** float(exp)


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _check_size(_power(_eval(node.left), _eval(node.right)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        return _check_size(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and node.args):
        return _check_size(_FUNCTIONS[node.func.id](*[_eval(a) for a in node.args]))
    shown = ast.unparse(node) if hasattr(ast, "unparse") else type(node).__name__
    raise ValueError(f"not arithmetic: {shown[:60]!r} is not allowed (numbers, + - * / // % **, parentheses, "
                     f"{', '.join(_FUNCTIONS)})")


def format_number(x: Number) -> str:
    """An exact integer or terminating decimal as such, anything else to 12 significant digits."""
    if isinstance(x, Fraction):
        if x.denominator == 1:
            return str(x.numerator)
        d = x.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        if d == 1:  # a terminating decimal: print it exactly
            digits = 0
            while (x * 10**digits).denominator != 1:
                digits += 1
            return _decimal(x, digits)
        x = float(x)
    return f"{x:.12g}"


def _decimal(x: Fraction, digits: int) -> str:
    scaled = abs(x.numerator) * 10**digits // x.denominator
    whole, frac = divmod(scaled, 10**digits)
    return f"{'-' if x < 0 else ''}{whole}.{frac:0{digits}d}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: The arithmetic expression, e.g. "(12.5 + 7) * 3 / 4" or "sqrt(144) + 2**10".
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression must be a string of at most {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not a valid expression: {exc.msg}") from None
    try:
        return format_number(_eval(tree))
    except (ZeroDivisionError, OverflowError, TypeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None

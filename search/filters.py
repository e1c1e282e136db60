"""`where` filters, parsed rather than pasted: each is read by a SQL parser (sqlglot) as exactly one
boolean expression over the table's own columns, checked against an allow-list, and the query is
written back from the parse tree. Filters are then AND-ed as whole trees, so ``1=1) OR (1=1`` can
never escape its parentheses and AND-ed access rules always hold.

A filter comes from anyone who can reach the server, and Lance runs it with DataFusion, which
offers hundreds of functions: ``length(repeat(path, 30000000)) > 0`` asks for 66 GB and aborts the
process. So only cheap, linear forms are allowed (:data:`FORMS`, :data:`FUNCTIONS`), and every
size is bounded before anything recursive runs: the text (:data:`MAX_LENGTH`), the nesting
(:data:`MAX_DEPTH`, checked on the tokens before sqlglot's recursive parser sees them, and again on
the tree, without recursion, before it is written back), IN lists, strings and numbers. AND/OR
chains are flat for sqlglot, Lance and DataFusion, so they do not count as nesting; a chain of
arithmetic does (Lance overflows its stack on ``1+1+...+1`` two thousand terms long).
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import sqlglot
from sqlglot import exp
from sqlglot.tokens import TokenType

from store.errors import InputError, first_line

DIALECT = "postgres"  # close to DataFusion's SQL, which Lance runs

MAX_LENGTH = 4096       # characters in one filter
MAX_DEPTH = 24          # parentheses, NOT, functions and operators inside one another
MAX_IN_ITEMS = 1000     # values in one IN list
MAX_STRING = 1024       # characters in one string literal
MAX_NUMBER = 32         # characters in one numeric literal
INT64_MAX = 2**63 - 1

CONDITIONS = (exp.Predicate, exp.Connector, exp.Not, exp.Boolean, exp.Escape)
BINARY = ("this", "expression")
OPERATORS: dict[type, tuple[str, ...]] = {  # node: the arguments it may carry
    **{kind: BINARY for kind in (exp.And, exp.Or, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE,
                                 exp.Add, exp.Sub, exp.Mul, exp.Mod)},
    exp.Div: ("this", "expression", "typed"),  # typed: integer division for integers, in DataFusion too
    exp.Not: ("this",), exp.Neg: ("this",), exp.Paren: ("this",),
    exp.Is: ("this", "expression", "negate"),
    exp.Like: ("this", "expression", "negate"), exp.ILike: ("this", "expression", "negate"),
    exp.Escape: BINARY,
    exp.In: ("this", "expressions"),
    exp.Between: ("this", "low", "high"),
    exp.Cast: ("this", "to"),
    exp.Column: ("this",), exp.Identifier: ("this", "quoted"),
    exp.Literal: ("this", "is_string"), exp.Null: (), exp.Boolean: ("this",),
}
FUNCTIONS: dict[type, tuple[str, tuple[str, ...]]] = {  # node: (its name, the arguments it may carry)
    exp.Lower: ("lower", ("this",)),
    exp.Upper: ("upper", ("this",)),
    exp.Length: ("length", ("this",)),  # also char_length, character_length
    exp.Abs: ("abs", ("this",)),
    exp.Round: ("round", ("this", "decimals")),
    exp.UnixToTime: ("to_timestamp", ("this",)),  # seconds since 1970, as in mtime
    exp.Extract: ("date_part", ("this", "expression")),  # also extract(unit FROM ...)
}
FUNCTION_NAMES = "abs, char_length, date_part, extract, length, lower, round, to_timestamp, upper"
FORMS = ("comparisons, AND/OR/NOT, IN (values), BETWEEN, [NOT] LIKE/ILIKE 'pattern', IS [NOT] NULL/TRUE/FALSE, "
         f"+ - * / %, CAST, and the functions {FUNCTION_NAMES}")
CAST_TYPES = {exp.DataType.Type.SMALLINT: "smallint", exp.DataType.Type.INT: "int", exp.DataType.Type.BIGINT: "bigint",
              exp.DataType.Type.BOOLEAN: "boolean", exp.DataType.Type.DATE: "date",
              exp.DataType.Type.TIMESTAMP: "timestamp"}
DATE_PARTS = ("year", "quarter", "month", "week", "day", "hour", "minute", "second", "dow", "doy", "epoch")
STRINGS = {exp.RawString: "$$dollar-quoted$$", exp.ByteString: "E'escaped'", exp.HexString: "x'hex'",
           exp.BitString: "b'bit'", exp.National: "N'national'"}
LEAVES = (exp.Column, exp.Identifier, exp.Literal, exp.Null, exp.Boolean, exp.DataType, exp.DataTypeParam, exp.Var)
CHAINS = (exp.And, exp.Or)
TOKEN_OPEN = {TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE}
TOKEN_CLOSE = {TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE}
TOKEN_CHAIN = {TokenType.AND, TokenType.OR, TokenType.COMMA}
TOKEN_OPERANDS = {TokenType.VAR, TokenType.IDENTIFIER, TokenType.STRING, TokenType.NUMBER, TokenType.NULL,
                  TokenType.TRUE, TokenType.FALSE}
TOO_DEEP = (f"it nests too deeply: at most {MAX_DEPTH} levels of parentheses, NOT, functions and operators "
            "inside one another")


def parse_filter(sql: str, columns: Iterable[str], times: Iterable[str] = ()) -> str:
    """*sql* as one boolean expression over *columns*, rewritten from its parse tree; InputError
    naming the problem otherwise (see the module's docstring for what is allowed). A quoted
    date or time compared with one of *times* (timestamp columns) is cast to a timestamp, which
    Lance does not do itself: ``taken_at >= '2021-01-01'``."""
    text = (sql or "").strip()
    if not text:
        raise InputError("the where filter is empty")

    def refuse(reason: str) -> InputError:
        shown = repr(text) if len(text) <= 120 else f"{text[:80]!r}... ({len(text)} characters)"
        return InputError(f"invalid where filter {shown}: {reason}")

    if len(text) > MAX_LENGTH:
        raise refuse(f"it is {len(text)} characters long; at most {MAX_LENGTH} are allowed")
    dialect = sqlglot.Dialect.get_or_raise(DIALECT)
    try:
        tokens = dialect.tokenize(text)
    except sqlglot.errors.SqlglotError:
        raise refuse("it cannot be read as SQL (an unclosed quote or comment?)") from None
    if token_depth(tokens) > MAX_DEPTH:
        raise refuse(TOO_DEEP)
    try:  # only an expression is parsed, never a statement
        trees = [t for t in dialect.parser().parse_into(exp.Condition, tokens, text) if t is not None]
    except sqlglot.errors.ParseError as error:
        raise refuse(parse_error(error)) from None
    except sqlglot.errors.SqlglotError as error:
        raise refuse(first_line(error)) from None
    except RecursionError:  # a caller already deep in its own stack: an error still, never a crash
        raise refuse(TOO_DEEP) from None
    if len(trees) != 1:
        raise refuse(f"give one condition, not {len(trees)} statements")
    tree = trees[0]
    condition = tree.unnest() if isinstance(tree, exp.Paren) else tree
    if not isinstance(condition, CONDITIONS):
        raise refuse("it must be a condition such as \"width > 500\"")
    if tree_depth(tree) > MAX_DEPTH:
        raise refuse(TOO_DEEP)
    problem = first_refused(tree, set(columns))
    if problem:
        raise refuse(problem)
    problem = _times_cast(tree, set(times))
    if problem:
        raise refuse(problem)
    for node in list(tree.find_all(exp.Extract)):  # Lance reads DATE_PART(...), not EXTRACT(... FROM ...)
        node.replace(exp.Anonymous(this="date_part", expressions=[exp.Literal.string(node.this.name.lower()),
                                                                  node.expression]))
    try:
        return tree.sql(dialect=DIALECT, comments=False)  # comments dropped: nothing but the tree goes out
    except RecursionError:
        raise refuse(TOO_DEEP) from None


COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Between, exp.In)
TIME_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?Z?$")


def _times_cast(tree: exp.Expression, times: set[str]) -> str | None:
    """Cast the quoted values that a comparison holds against a timestamp column to timestamps,
    in place; the reason a value is refused (not a date), or None."""
    if not times:
        return None
    for node in list(tree.find_all(*COMPARISONS)):
        operands = [node.this, *(node.args.get(key) for key in ("expression", "low", "high")),
                    *(node.args.get("expressions") or [])]
        if not any(isinstance(o, exp.Column) and o.name in times for o in operands):
            continue
        for operand in operands:
            if isinstance(operand, exp.Literal) and operand.is_string:
                if not TIME_TEXT.match(operand.this):
                    return f"{operand.this!r} is not a date or time (write '2021-01-01' or '2021-01-01 18:30:00', UTC)"
                operand.replace(exp.Cast(this=exp.Literal.string(operand.this.rstrip("Z").replace("T", " ")),
                                         to=exp.DataType.build("TIMESTAMP")))
    return None


def combine(filters: Iterable[str]) -> str:
    """Filters already passed through :func:`parse_filter`, AND-ed."""
    return " AND ".join(f"({f})" for f in filters)


def token_depth(tokens) -> int:
    """How deep *tokens* nest, counted without recursion before the parser recurses: each open
    parenthesis or bracket, plus each operator or keyword since the last AND, OR or comma at its
    level (NOT NOT NOT x, - - x and 1 + 1 + 1 each nest in the parser). Errs high rather than
    low; stops counting once past :data:`MAX_DEPTH`."""
    pending, depth = [0], 0  # operators since the last AND/OR/comma, per open parenthesis
    for token in tokens:
        kind = token.token_type
        if kind in TOKEN_OPEN:
            pending.append(0)
            depth += 1
        elif kind in TOKEN_CLOSE:
            if len(pending) > 1:
                depth -= 1 + pending.pop()
        elif kind in TOKEN_CHAIN:
            depth -= pending[-1]
            pending[-1] = 0
        elif kind not in TOKEN_OPERANDS:
            pending[-1] += 1
            depth += 1
        if depth > MAX_DEPTH:
            return depth
    return depth


def tree_depth(tree: exp.Expression) -> int:
    """The deepest nesting of operators and functions in *tree* (leaves and AND/OR chains do not
    count), walked with a stack of its own, not Python's; stops once past :data:`MAX_DEPTH`."""
    deepest, stack = 0, [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, LEAVES) and not (isinstance(node, CHAINS) and type(node.parent) is type(node)):
            depth += 1
        if depth > MAX_DEPTH:
            return depth
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in node.iter_expressions())
    return deepest


def first_refused(tree: exp.Expression, known: set[str]) -> str | None:
    """Why *tree* is refused (the outermost reason, walked breadth first without recursion), or None."""
    for node in tree.walk():
        problem = refused(node, known)
        if problem:
            return problem
    return None


def refused(node: exp.Expression, known: set[str]) -> str | None:
    kind = type(node)
    if kind is exp.DataType and type(node.parent) is exp.Cast:
        return None  # checked with its CAST
    if kind is exp.Var and type(node.parent) is exp.Extract and node.arg_key == "this":
        return None  # the unit, checked with its date_part
    if kind in FUNCTIONS:
        name, allowed = FUNCTIONS[kind]
        if extra_args(node, allowed):
            return f"this form of {name}() is not allowed ({arity(kind)})"
        if kind is exp.Extract:
            unit = node.this.name.lower() if isinstance(node.this, exp.Var) else node.this.sql(dialect=DIALECT)
            if unit not in DATE_PARTS:
                return f"date_part() takes one of the units {', '.join(DATE_PARTS)}, not {unit!r}"
        return None
    if kind not in OPERATORS:
        return not_allowed(node)
    if kind is exp.Column and (node.table or node.name not in known):
        return f"unknown column '{node.sql()}' (columns: {', '.join(sorted(known))})"
    if kind is exp.In and (node.args.get("query") or node.args.get("unnest")):
        return "subqueries are not allowed: IN takes a list of values"
    if extra_args(node, OPERATORS[kind]):
        return f"{snippet(node)!r} is not allowed (allowed: {FORMS})"
    if kind is exp.Literal:
        return literal_problem(node)
    elif kind is exp.In:
        return in_problem(node)
    elif kind in (exp.Like, exp.ILike):
        if not is_string(node.expression):
            return f"the pattern of LIKE must be a quoted string, not {snippet(node.expression)!r}"
    elif kind is exp.Escape:
        if type(node.this) not in (exp.Like, exp.ILike) or not is_string(node.expression) \
                or node.expression.this != "\\":
            return "ESCAPE takes only '\\' (already the escape character of LIKE in DataFusion), after LIKE or ILIKE"
    elif kind is exp.Is:
        if type(node.expression) not in (exp.Null, exp.Boolean):
            return f"IS takes NULL, TRUE or FALSE, not {snippet(node.expression)!r}"
    elif kind is exp.Cast:
        to = node.args.get("to")
        if not isinstance(to, exp.DataType) or to.this not in CAST_TYPES or to.expressions or to.args.get("nested"):
            shown = to.sql(dialect=DIALECT) if to is not None else "?"
            return f"CAST to {shown} is not allowed (types: {', '.join(sorted(CAST_TYPES.values()))})"
    return None


def not_allowed(node: exp.Expression) -> str:
    if isinstance(node, (exp.Query, exp.Subquery, exp.Exists, exp.DDL, exp.DML, exp.Command)):
        return "subqueries and statements are not allowed"
    if isinstance(node, exp.Window):
        return "window functions (OVER) are not allowed"
    if isinstance(node, (exp.Placeholder, exp.Parameter)):
        return "parameters such as ? and $1 are not allowed"
    if isinstance(node, (exp.Case, exp.If)):
        return f"CASE is not allowed (allowed: {FORMS})"
    if isinstance(node, exp.TryCast):
        return "TRY_CAST is not allowed: use CAST"
    if isinstance(node, exp.StrToTime):
        return arity(exp.UnixToTime)
    if isinstance(node, exp.Func):
        return f"the function {function_name(node)}() is not allowed (allowed: {FUNCTION_NAMES})"
    for kind, written in STRINGS.items():
        if isinstance(node, kind):
            return f"{written} strings are not allowed: write plain 'quoted' strings"
    return f"{snippet(node)!r} is not allowed (allowed: {FORMS})"


def literal_problem(node: exp.Literal) -> str | None:
    value = node.this
    if node.is_string:
        if len(value) > MAX_STRING:
            return f"a string of {len(value)} characters is longer than the {MAX_STRING} allowed"
        return None
    if len(value) > MAX_NUMBER:
        return f"the number {value[:40]}... is longer than the {MAX_NUMBER} characters allowed"
    try:
        number = float(value)
    except ValueError:
        return f"{value!r} is not a number"
    if not math.isfinite(number):
        return f"the number {value} is out of range"
    if value.isdigit() and int(value) > INT64_MAX:
        return f"the integer {value} is out of range (at most {INT64_MAX})"
    return None


def in_problem(node: exp.In) -> str | None:
    items = node.expressions
    if not items:
        return "an IN list needs at least one value"
    if len(items) > MAX_IN_ITEMS:
        return f"an IN list of {len(items)} values is longer than the {MAX_IN_ITEMS} allowed"
    for item in items:
        value = item.this if type(item) is exp.Neg else item
        negated_number = type(value) is exp.Literal and not value.is_string
        if type(value) not in (exp.Literal, exp.Null, exp.Boolean) or (value is not item and not negated_number):
            return f"IN takes a list of values (numbers, 'strings', TRUE, FALSE, NULL), not {snippet(item)!r}"
    return None


def extra_args(node: exp.Expression, allowed: tuple[str, ...]) -> list[str]:
    """The arguments *node* carries beyond *allowed* (sqlglot leaves the unused ones None, False or [])."""
    return [key for key, value in node.args.items() if key not in allowed and not unused(value)]


def unused(value) -> bool:
    return value is None or value is False or (isinstance(value, list) and not value)


def arity(kind: type) -> str:
    if kind is exp.UnixToTime:
        return "to_timestamp() takes one argument, seconds since 1970, as in to_timestamp(mtime)"
    if kind is exp.Round:
        return "round() takes a number and, optionally, the decimals to keep"
    return "it takes one argument"


def is_string(node: exp.Expression | None) -> bool:
    return type(node) is exp.Literal and node.is_string


def function_name(node: exp.Func) -> str:
    """The name as the user will recognise it: lpad (not PAD), generate_series, regexp_like."""
    if isinstance(node, exp.Anonymous):
        return node.name.lower()
    try:
        written = re.match(r"[A-Za-z_][A-Za-z0-9_]*(?=\(|$)", node.sql(dialect=DIALECT, comments=False))
    except Exception:  # a form this generator cannot write: its canonical name will do
        written = None
    return (written.group(0) if written else node.sql_name()).lower()


def snippet(node: exp.Expression | None, limit: int = 60) -> str:
    try:
        text = node.sql(dialect=DIALECT, comments=False) if node is not None else ""
    except Exception:  # a form this generator cannot write
        text = type(node).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_error(error: sqlglot.errors.ParseError) -> str:
    """sqlglot's first complaint, without its class paths: "Invalid expression / Unexpected token at
    column 4 (')')"."""
    if not error.errors:
        return first_line(error)
    first = error.errors[0]
    description = re.sub(r"<class '[\w.]*?(\w+)'>", r"\1", str(first.get("description") or "cannot parse it"))
    where = f" at column {first['col']}" if first.get("col") else ""
    near = f" ({first['highlight']!r})" if first.get("highlight") else ""
    return f"{description}{where}{near}"

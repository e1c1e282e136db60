"""`where` filters, parsed rather than pasted: each is read by a SQL parser (sqlglot) as exactly one
boolean expression over the table's own columns, and the query is written back from the parse
tree. Filters are then AND-ed as whole trees, so ``1=1) OR (1=1`` can never escape its
parentheses and AND-ed access rules always hold."""

from __future__ import annotations

from typing import Iterable

import sqlglot
from sqlglot import exp

from store.errors import InputError, first_line

DIALECT = "postgres"  # close to DataFusion's SQL, which Lance runs
CONDITIONS = (exp.Predicate, exp.Connector, exp.Not, exp.Boolean)
FORBIDDEN = (exp.Query, exp.Subquery, exp.Command, exp.DDL, exp.DML, exp.Placeholder, exp.Parameter)


def parse_filter(sql: str, columns: Iterable[str]) -> str:
    """*sql* as one boolean expression over *columns*, rewritten from its parse tree; InputError
    naming the problem otherwise."""
    text = (sql or "").strip()
    if not text:
        raise InputError("the where filter is empty")
    try:
        statements = [s for s in sqlglot.parse(text, read=DIALECT) if s is not None]
    except sqlglot.errors.SqlglotError as error:
        raise InputError(f"invalid where filter {text!r}: {first_line(error)}") from None
    if len(statements) != 1:
        raise InputError(f"invalid where filter {text!r}: give one condition, not {len(statements)} statements")
    tree = statements[0]
    condition = tree.unnest() if isinstance(tree, exp.Paren) else tree
    if not isinstance(condition, CONDITIONS):
        raise InputError(f"invalid where filter {text!r}: it must be a condition such as \"width > 500\"")
    if any(isinstance(node, FORBIDDEN) for node in tree.walk()):
        raise InputError(f"invalid where filter {text!r}: subqueries and statements are not allowed")
    known = set(columns)
    for column in tree.find_all(exp.Column):
        if column.table or column.name not in known:
            raise InputError(f"invalid where filter {text!r}: unknown column '{column.sql()}' "
                             f"(columns: {', '.join(sorted(known))})")
    return tree.sql(dialect=DIALECT)


def combine(filters: Iterable[str]) -> str:
    """Filters already passed through :func:`parse_filter`, AND-ed."""
    return " AND ".join(f"({f})" for f in filters)

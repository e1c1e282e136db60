"""`where` filters are an allow-list with bounds (issue 23, item 1: filters that cannot be weapons).

Each allowed form is run for real through Lance on a store, so nothing on the list is one DataFusion
then rejects; each refused form and each bound is shown to be refused with a one-line InputError
naming it, in Python, on the command line and over HTTP. The attacks are first checked against
parse_filter itself, so with the fix taken away they fail there, before anything runs them."""

from __future__ import annotations

import datetime as dt
import sys

import numpy as np
import pytest
from sqlglot import exp

from search import Query, filters
from search.filters import (
    MAX_DEPTH,
    MAX_IN_ITEMS,
    MAX_LENGTH,
    MAX_STRING,
    combine,
    parse_filter,
    tree_depth,
)
from server import ServeConfig, create_app
from store import InputError, Store
from tests.helpers import clipdex, local_client, run

COLUMNS = ["id", "hash", "path", "bytes", "mtime", "width", "height", "caption"]
REPEAT = "length(repeat(path, 30000000)) > 0"  # a 66 GB allocation, then an abort, before the allow-list
PARENS = "(" * 50 + "width > 1" + ")" * 50  # a RecursionError in sqlglot's parser before the depth bound
NOTS = "NOT " * 1000 + "width > 1"  # the same, within the length bound
SUM = "width > " + "+".join(["1"] * 2000)  # within the length bound; Lance overflows its stack on it


def refusal(sql: str, columns=COLUMNS) -> str:
    with pytest.raises(InputError) as caught:
        parse_filter(sql, columns)
    message = str(caught.value)
    assert message.startswith("invalid where filter ") and "\n" not in message and len(message) < 600, message
    return message


# 1. What is allowed, and what it is written back as


@pytest.mark.parametrize("sql, written", [
    ("width > 1 AND NOT height <= 2 OR id <> 3 AND id != 4 AND id = 5 AND id >= 1 AND id < 9",
     "width > 1 AND NOT height <= 2 OR id <> 3 AND id <> 4 AND id = 5 AND id >= 1 AND id < 9"),
    ("id NOT IN (1, -2)", "NOT id IN (1, -2)"),
    ("width NOT BETWEEN 1 AND 2", "NOT width BETWEEN 1 AND 2"),
    ("path NOT ILIKE '%A%'", "path NOT ILIKE '%A%'"),
    ("path LIKE 'a\\%' ESCAPE '\\'", "path LIKE 'a\\%' ESCAPE '\\'"),
    ("caption IS NOT NULL", "caption IS NOT NULL"),
    ("(width > 1) IS NOT FALSE", "NOT (width > 1) IS FALSE"),
    ("width + 1 - 2 * 3 / 4 % 5 > -width", "width + 1 - 2 * 3 / 4 % 5 > -width"),
    ("char_length(path) > character_length(caption)", "LENGTH(path) > LENGTH(caption)"),
    ("date_part('year', to_timestamp(mtime)) = 2024", "DATE_PART('year', TO_TIMESTAMP(mtime)) = 2024"),
    ("extract(month FROM to_timestamp(mtime)) = 1", "DATE_PART('month', TO_TIMESTAMP(mtime)) = 1"),
    ("to_timestamp(mtime) > TIMESTAMP '2024-01-01'", "TO_TIMESTAMP(mtime) > CAST('2024-01-01' AS TIMESTAMP)"),
    ("width::bigint > 1", "CAST(width AS BIGINT) > 1"),
    ("width > 1 -- */ ) OR ( TRUE /*", "width > 1"),  # comments never go out
    ("caption = 'it''s \\ a\nb'", "caption = 'it''s \\ a\nb'"),  # backslashes are plain characters in Lance too
])
def test_allowed_forms_are_written_back_from_the_tree(sql, written):
    assert parse_filter(sql, COLUMNS) == written


def test_the_bounds_themselves_are_allowed():
    parse_filter("(" * (MAX_DEPTH - 1) + "width > 1" + ")" * (MAX_DEPTH - 1), COLUMNS)
    parse_filter("id IN (" + ",".join(["1"] * MAX_IN_ITEMS) + ")", COLUMNS)
    parse_filter(f"caption = '{'x' * MAX_STRING}'", COLUMNS)
    parse_filter("id < 9223372036854775807 AND mtime > 1.5e3", COLUMNS)
    chain = " OR ".join(f"width = {i}" for i in range(250))  # AND/OR chains are flat: they do not nest
    assert len(chain) <= MAX_LENGTH and parse_filter(chain, COLUMNS) == chain


# 2. What is refused, named in the message


@pytest.mark.parametrize("sql, named", [
    (REPEAT, "the function repeat() is not allowed (allowed: abs, char_length, date_part, extract, length, lower,"),
    ("lpad(path, 2000000000, 'x') = ''", "the function lpad() is not allowed"),
    ("rpad(path, 2000000000) = ''", "the function rpad() is not allowed"),
    ("concat(path, path) = ''", "the function concat() is not allowed"),
    ("regexp_replace(path, 'a', 'b') = ''", "the function regexp_replace() is not allowed"),
    ("path ~ '(a+)+$'", "the function regexp_like() is not allowed"),
    ("generate_series(1, 2) = 1", "the function generate_series() is not allowed"),
    ("array_length(ARRAY[1], 1) = 1", "the function array_length() is not allowed"),
    ("octet_length(path) > 1", "the function octet_length() is not allowed"),
    ("count(*) > 1", "the function count() is not allowed"),
    ("random() > 0.5", "the function random() is not allowed"),
    ("now() > to_timestamp(mtime)", "the function current_timestamp() is not allowed"),
    ("floor(mtime) > 1", "the function floor() is not allowed"),  # Lance cannot run FLOOR(...) anyway
    ("row_number() OVER () > 1", "window functions (OVER) are not allowed"),
    ("id IN (SELECT id FROM images)", "subqueries are not allowed"),
    ("width > (SELECT max(width) FROM images)", "subqueries and statements are not allowed"),
    ("EXISTS (SELECT 1)", "subqueries and statements are not allowed"),
    ("CASE WHEN width > 1 THEN 1 ELSE 0 END = 1", "CASE is not allowed"),
    ("path || path = ''", "'path || path' is not allowed (allowed: comparisons, AND/OR/NOT"),
    ("width & 1 = 1", "'width & 1' is not allowed"),
    ("width IS DISTINCT FROM 1", "'width IS DISTINCT FROM 1' is not allowed"),
    ("path SIMILAR TO 'a'", "is not allowed"),
    ("width BETWEEN SYMMETRIC 1 AND 2", "'width BETWEEN SYMMETRIC 1 AND 2' is not allowed"),
    ("path LIKE caption", "the pattern of LIKE must be a quoted string, not 'caption'"),
    ("path LIKE ANY ('a', 'b')", "the pattern of LIKE must be a quoted string"),
    ("path LIKE 'a!%' ESCAPE '!'", "ESCAPE takes only '\\'"),  # DataFusion knows no other
    ("id IN (width)", "IN takes a list of values (numbers, 'strings', TRUE, FALSE, NULL), not 'width'"),
    ("id IN ()", "an IN list needs at least one value"),
    ("TRY_CAST(path AS INT) > 1", "TRY_CAST is not allowed: use CAST"),
    ("CAST(width AS DOUBLE) > 1", "CAST to DOUBLE PRECISION is not allowed (types: bigint, boolean, date, int,"),
    ("CAST(width AS VARCHAR) = '1'", "CAST to VARCHAR is not allowed"),
    ("CAST(mtime AS TIMESTAMP(3)) > 1", "CAST to TIMESTAMP(3) is not allowed"),
    ("to_timestamp(caption, 'YYYY') > 1", "to_timestamp() takes one argument, seconds since 1970"),
    ("date_part('century', to_timestamp(mtime)) > 1", "date_part() takes one of the units year, quarter,"),
    ("round(mtime, 2, 3) > 1", "this form of round() is not allowed"),
    ("caption = E'\\x41'", "E'escaped' strings are not allowed: write plain 'quoted' strings"),
    ("caption = N'x'", "N'national' strings are not allowed"),  # Lance panics on these
    ("caption = x'00'", "x'hex' strings are not allowed"),
    ("caption = $$x$$", "$$dollar-quoted$$ strings are not allowed"),
    ("path = ?", "parameters such as ? and $1 are not allowed"),
    ("path = $1", "parameters such as ? and $1 are not allowed"),
])
def test_everything_else_is_refused_by_name(sql, named):
    assert named in refusal(sql)


@pytest.mark.parametrize("sql, named", [
    ("x" * (MAX_LENGTH + 1), f"it is {MAX_LENGTH + 1} characters long; at most {MAX_LENGTH} are allowed"),
    (PARENS, f"it nests too deeply: at most {MAX_DEPTH} levels"),
    ("(" * 1000 + "width > 1" + ")" * 1000, "it nests too deeply"),
    ("(" * MAX_DEPTH + "width > 1" + ")" * MAX_DEPTH, "it nests too deeply"),
    (NOTS, "it nests too deeply"),
    ("- " * 30 + "width > 1", "it nests too deeply"),
    ("abs(" * MAX_DEPTH + "width" + ")" * MAX_DEPTH + " > 1", "it nests too deeply"),  # caught on the tree
    (SUM, "it nests too deeply"),
    ("id IN (" + ",".join(["1"] * (MAX_IN_ITEMS + 1)) + ")", f"an IN list of {MAX_IN_ITEMS + 1} values is longer "
                                                            f"than the {MAX_IN_ITEMS} allowed"),
    (f"caption = '{'x' * (MAX_STRING + 1)}'", f"a string of {MAX_STRING + 1} characters is longer than the "
                                              f"{MAX_STRING} allowed"),
    ("width > " + "1" * 33, "is longer than the 32 characters allowed"),
    ("length(path) * 99999999999999999999 > 0", "the integer 99999999999999999999 is out of range"),
    ("id > 9223372036854775808", "is out of range (at most 9223372036854775807)"),
    ("mtime > 1e400", "the number 1e400 is out of range"),
])
def test_each_bound_is_refused_by_name(sql, named):
    message = refusal(sql)
    assert named in message
    if len(sql) > 120:
        assert f"({len(sql)} characters)" in message  # the text is shown cut short


def test_the_nesting_is_refused_before_sqlglot_parses(monkeypatch):
    def parse_into(*args, **kwargs):
        raise AssertionError("the recursive parser ran")

    monkeypatch.setattr(filters.sqlglot.parser.Parser, "parse_into", parse_into)
    for sql in (PARENS, NOTS, "NOT (" * 500 + "width > 1" + ")" * 500, "abs(" * 500 + "width" + ")" * 500 + " > 1"):
        assert "it nests too deeply" in refusal(sql)


def test_a_recursion_error_in_the_parser_is_an_input_error(monkeypatch):
    def parse_into(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(filters.sqlglot.parser.Parser, "parse_into", parse_into)
    assert "it nests too deeply" in refusal("width > 1")


def test_the_deepest_filters_allowed_parse_with_frames_to_spare():
    """MAX_DEPTH is what sqlglot's recursive parser can take in 700 of Python's 1000 frames (a
    function call costs it about 25 frames a level), leaving the rest to a server's or a test's own."""
    deepest = ["(" * (MAX_DEPTH - 1) + "width > 1" + ")" * (MAX_DEPTH - 1), "NOT " * (MAX_DEPTH - 1) + "width > 1",
               "abs(" * (MAX_DEPTH - 1) + "width" + ")" * (MAX_DEPTH - 1) + " > 1",
               "round(" * (MAX_DEPTH - 2) + "mtime" + ", 1)" * (MAX_DEPTH - 2) + " > 1"]
    frame, below = sys._getframe(), 0
    while frame:
        frame, below = frame.f_back, below + 1
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(below + 700)
    try:
        for sql in deepest:
            parse_filter(sql, COLUMNS)
    finally:
        sys.setrecursionlimit(limit)


def test_the_tree_is_measured_without_recursion():
    deep = exp.column("width")
    for _ in range(100_000):  # far deeper than Python's stack
        deep = exp.Not(this=deep)
    assert tree_depth(deep) == MAX_DEPTH + 1  # stops counting past the bound
    chain = exp.column("width").eq(0)
    for i in range(1, 100_000):
        chain = exp.Or(this=chain, expression=exp.column("width").eq(i))
    assert tree_depth(chain) == 2  # an OR chain is flat: OR, then its comparisons


# 3. What parse_filter refused before, and combine


@pytest.mark.parametrize("sql, named", [
    ("1=1) OR (1=1", "Invalid expression / Unexpected token at column 4 (')')"),
    ("width > 1; DROP TABLE images", "Unexpected token"),
    ("width > 1; width < 2", "give one condition, not 2 statements"),
    ("(SELECT 1)", "it must be a condition"),
    ("width", "it must be a condition such as \"width > 500\""),
    ("colour = 'red'", "unknown column 'colour' (columns: bytes, caption, hash, height, id, mtime, path, width)"),
    ("images.width > 1", "unknown column 'images.width'"),
    ("caption = 'abc", "it cannot be read as SQL"),
    ("widht >>> 3", "invalid where filter 'widht >>> 3'"),
])
def test_what_was_refused_before_still_is(sql, named):
    assert named in refusal(sql)


def test_an_empty_filter_and_combine():
    with pytest.raises(InputError, match="the where filter is empty"):
        parse_filter("  ", COLUMNS)
    parts = [parse_filter("width > 1 OR TRUE", COLUMNS), parse_filter("id = 2", COLUMNS)]
    assert combine(parts) == "(width > 1 OR TRUE) AND (id = 2)"


# 4. Every allowed form runs in Lance, with the rows it should give


def in_year(row) -> int:
    return dt.datetime.fromtimestamp(row["mtime"], dt.timezone.utc).year


RUNS = {  # filter: which rows it keeps, in Python
    "width > 300": lambda r: r["width"] > 300,
    "width >= 300 AND height < 300 OR id = 1": lambda r: r["width"] >= 300 and r["height"] < 300 or r["id"] == 1,
    "NOT (width <> height)": lambda r: r["width"] == r["height"],
    "id IN (1, 2, 3, -4)": lambda r: r["id"] in (1, 2, 3),
    "id NOT IN (1, 2)": lambda r: r["id"] not in (1, 2),
    "width BETWEEN 100 AND 300": lambda r: 100 <= r["width"] <= 300,
    "width NOT BETWEEN 100 AND 300": lambda r: not 100 <= r["width"] <= 300,
    "path LIKE '%.png'": lambda r: r["path"].endswith(".png"),
    "path NOT LIKE '%.png'": lambda r: not r["path"].endswith(".png"),
    "path ILIKE '%.PNG'": lambda r: r["path"].lower().endswith(".png"),
    "path NOT ILIKE '%.PNG'": lambda r: not r["path"].lower().endswith(".png"),
    "path LIKE '%\\_%' ESCAPE '\\'": lambda r: "_" in r["path"],
    "path LIKE '%\\_%'": lambda r: "_" in r["path"],  # the backslash escapes without ESCAPE too
    "caption IS NULL": lambda r: r["caption"] is None,
    "caption IS NOT NULL": lambda r: r["caption"] is not None,
    "(width > 300) IS TRUE": lambda r: r["width"] > 300,
    "(width > 300) IS NOT TRUE": lambda r: not r["width"] > 300,
    "(width > 300) IS FALSE": lambda r: not r["width"] > 300,
    "TRUE": lambda r: True,
    "NOT FALSE": lambda r: True,
    "caption = NULL": lambda r: False,
    "width + 1 - height * 2 > -width": lambda r: r["width"] + 1 - r["height"] * 2 > -r["width"],
    "width / 3 = 100": lambda r: r["width"] // 3 == 100,  # integer division, as in Python for these
    "width % 2 = 0": lambda r: r["width"] % 2 == 0,
    "mtime / 1.5 > 0": lambda r: True,
    "lower(path) LIKE '%.png'": lambda r: r["path"].lower().endswith(".png"),
    "upper(path) LIKE '%.PNG'": lambda r: r["path"].upper().endswith(".PNG"),
    "length(path) > 60": lambda r: len(r["path"]) > 60,
    "char_length(path) = character_length(path)": lambda r: True,
    "abs(width - height) < 50": lambda r: abs(r["width"] - r["height"]) < 50,
    "round(mtime) >= 0 AND round(mtime, 2) > 0": lambda r: True,
    "round(width, -2) = 300": lambda r: 250 <= r["width"] < 350,  # half away from zero, not to even
    "to_timestamp(mtime) > TIMESTAMP '2000-01-01'": lambda r: r["mtime"] > 946684800,
    "to_timestamp(mtime) > '2000-01-01'": lambda r: r["mtime"] > 946684800,
    "date_part('year', to_timestamp(mtime)) >= 2000": lambda r: in_year(r) >= 2000,
    "extract(year FROM to_timestamp(mtime)) < 2000": lambda r: in_year(r) < 2000,
    "CAST(to_timestamp(mtime) AS DATE) >= DATE '2000-01-01'": lambda r: r["mtime"] >= 946684800,
    "CAST(width AS SMALLINT) > 300": lambda r: r["width"] > 300,
    "CAST(width AS INT) > 300": lambda r: r["width"] > 300,
    "CAST(width AS BIGINT) * 4000000000 > 1200000000000": lambda r: r["width"] > 300,
    "CAST(width AS BOOLEAN) = TRUE": lambda r: r["width"] != 0,
    "CAST('2000-01-01 00:00:00' AS TIMESTAMP) < to_timestamp(mtime)": lambda r: r["mtime"] > 946684800,
    "width > - -300": lambda r: r["width"] > 300,
    "(" * (MAX_DEPTH - 1) + "width > 300" + ")" * (MAX_DEPTH - 1): lambda r: r["width"] > 300,
    " OR ".join(f"width = {w}" for w in range(200, 400)): lambda r: 200 <= r["width"] < 400,
    "id IN (" + ",".join(["1"] * (MAX_IN_ITEMS - 1)) + ",2)": lambda r: r["id"] in (1, 2),
    f"caption = '{'x' * MAX_STRING}'": lambda r: False,
    "id < 9223372036854775807": lambda r: True,
}


@pytest.fixture(scope="module")
def store(served_library):
    return Store.open(served_library[0])


@pytest.fixture(scope="module")
def rows(store):
    table = store.tables.images.to_arrow()
    return table.select(["id", "path", "width", "height", "caption", "mtime"]).to_pylist()


def matching(store, sql: str) -> set[int]:
    vector = np.ones(store.manifest.dim, np.float32)
    hits = Query.create(store, vector=vector).limit(store.tables.count()).where(sql).to_list()
    return {hit["id"] for hit in hits}


@pytest.mark.parametrize("sql", list(RUNS), ids=lambda sql: sql[:50])
def test_each_allowed_form_runs_in_lance(sql, store, rows):
    assert matching(store, sql) == {r["id"] for r in rows if RUNS[sql](r)}


def test_the_filters_above_really_filter(store, rows):
    wide = matching(store, "width > 300")
    assert 0 < len(wide) < len(rows) and len({r["path"][-4:] for r in rows}) > 1


@pytest.mark.parametrize("unit", filters.DATE_PARTS)
def test_each_date_part_runs_in_lance(unit, store, rows):
    # IS NOT NULL, not ">= 0": DataFusion rewrites a year comparison into one on timestamps, which
    # goes wrong for years outside 1678-2261 (year >= 0 keeps no row)
    assert matching(store, f"date_part('{unit}', to_timestamp(mtime)) IS NOT NULL") == {r["id"] for r in rows}


@pytest.mark.parametrize("sql", ["width / 0 > 1", "CAST(path AS INT) > 1", "to_timestamp(id * 9223372036854775807) > "
                                 "TIMESTAMP '2000-01-01'", "abs(id - id - 9223372036854775807 - 1) > 0"])
def test_an_allowed_filter_that_fails_on_the_data_is_an_input_error(sql, store):
    with pytest.raises(InputError, match="invalid where filter"):
        matching(store, sql)


# 5. The command line and the server answer an attack with one line


ATTACKS = [PARENS, NOTS, REPEAT, SUM]


@pytest.mark.parametrize("sql", ATTACKS, ids=["parens", "nots", "repeat", "sum"])
def test_the_command_line_refuses_an_attack_in_one_line(sql, capsys, served_library):
    refusal(sql)  # first: were this not refused, the search below would run it
    code, out, err = run(capsys, "search", "a shape", "--store", served_library[0], "--device", "cpu", "--where", sql)
    assert code == 1 and out == "" and err.startswith("error: invalid where filter") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_the_command_line_process_refuses_deep_nesting_without_a_traceback(served_library):
    done = clipdex("search", "a shape", "--store", served_library[0], "--device", "cpu", "--where", PARENS)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith("error: invalid where filter") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("sql", [PARENS, "NOT " * 400 + "width > 1", REPEAT], ids=["parens", "nots", "repeat"])
def test_the_server_answers_an_attack_with_400(sql, served_library):
    refusal(sql)
    with local_client(create_app(ServeConfig(store=served_library[0]))) as client:
        response = client.post("/search", json={"id": 1, "where": sql})
        assert response.status_code == 400 and response.json()["error"].startswith("invalid where filter"), response.text
        assert client.get("/health").status_code == 200

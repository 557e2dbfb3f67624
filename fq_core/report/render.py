"""The Jinja2 environment of the report's templates (fq_core/report/templates/).

`*.html.j2` are autoescaped: every value from a record (model names, generated text, command
lines) is text, never markup. `*.md.j2` are not; markdown table cells go through the `cell`
filter instead. Undefined names are errors (StrictUndefined): a misspelt field in a template
fails the render, it never prints as an empty cell.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


def cell(value: Any) -> str:
    """Text safe inside a markdown table cell: no pipe, no line break."""
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def text(value: Any) -> str:
    """Free text (generated output) shown as text in markdown: no raw HTML."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@functools.cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("fq_core.report", "templates"),
        autoescape=select_autoescape(
            enabled_extensions=("html.j2",), disabled_extensions=("md.j2",), default=True
        ),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["cell"] = cell
    env.filters["text"] = text
    env.filters["b64"] = b64
    return env


def macros(template: str):
    """A template's macros, callable from Python (each returns its rendered text)."""
    return environment().get_template(template).module


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)

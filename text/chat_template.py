"""Chat templates: the Jinja2 dialect of Hugging Face chat templates, sandboxed."""

from __future__ import annotations

import datetime
import json
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox


class _GenerationTag(jinja2.ext.Extension):
    """Renders the body of `{% generation %}...{% endgeneration %}`, which some templates use."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    """Jinja's `tojson` without HTML escaping, as transformers defines it for chat templates."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compiles a chat template in the same sandboxed environment transformers renders it in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)

"""System-prompt composition: global -> org -> user blocks, sandboxed templates, sanitised text.

Pure: prompt parts and variables in, a composed prompt (text, version, injection signals) out.
The prompt is guidance for the agent, not a security control: nothing secret is rendered into it.
Templates are user-written code: each render runs under a time deadline and an output cap, and callers
on the event loop run it in a render process with a memory cap (`PromptCache.compose`, `check_template`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import multiprocessing
import re
import resource
import sys
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, TypeVar

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

Scope = Literal["global", "org", "user"]
SCOPE_ORDER: dict[Scope, int] = {"global": 0, "org": 1, "user": 2}
_MAX_STRING_PRODUCT = 100_000
_Result = TypeVar("_Result")


class PromptError(ValueError):
    """A prompt that cannot be used; `field` names what was wrong with it, `part_id` which stored prompt
    (None when the fault is no single prompt's, or the prompt is not stored yet)."""

    def __init__(self, field: str, message: str, part_id: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.part_id = part_id

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a render process, re-raised on the loop
        return (PromptError, (self.field, str(self), self.part_id))


class RenderUnavailable(RuntimeError):
    """No render process could finish the render (one died under it): nobody's fault, try again."""


@dataclass(frozen=True)
class PromptPart:
    id: str
    scope: Scope
    content: str
    priority: int = 0
    # Only template prompts are rendered; plain ones are taken literally (still sanitised).
    is_template: bool = False
    # Any value that changes whenever the content does (a row version or an updated-at timestamp).
    version: str = ""


@dataclass(frozen=True)
class InjectionSignal:
    part_id: str
    scope: Scope
    pattern: str


@dataclass(frozen=True)
class ComposedPrompt:
    text: str
    version: str
    signals: tuple[InjectionSignal, ...] = field(default=())


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus bounds on `*` and `**` so a template cannot allocate gigabytes."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("exponent too large")
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(count, int) \
                        and len(sequence) * count > _MAX_STRING_PRODUCT:
                    raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


_environment = _BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


class _RenderDeadlinePassed(BaseException):
    """Raised into a render that outlived its deadline. Not an Exception, so no `except Exception` on the
    way up (Jinja's own, a filter's) can swallow it: CPython drops the trace function once it raises, and
    a swallowed abort would let the render run on unwatched."""


@contextmanager
def _deadline(until: float) -> Iterator[None]:
    """Abort the Python code this thread runs inside the block once time.monotonic() passes `until`.

    A trace function checks the clock at every line event, loop iterations included, so nested loops
    cannot outrun it. One long C-level call emits no events and is caught only when it returns: the
    sandbox caps the ranges and repetitions that would make one long."""

    def check(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > until:
            raise _RenderDeadlinePassed
        return check

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_template(source: str, variables: Mapping[str, Any], *, deadline: float, max_chars: int,
                    field: str = "content", part_id: str | None = None) -> str:
    """Render `source` in the sandbox, aborted once time.monotonic() passes `deadline` or the output
    passes `max_chars` (streamed, so a runaway template never builds its whole output). Blocking: call it
    from a worker thread."""
    chunks: list[str] = []
    length = 0
    try:
        with _deadline(deadline):
            stream = _environment.from_string(source).generate(**variables)
            try:
                for chunk in stream:
                    length += len(chunk)
                    if length > max_chars:
                        raise PromptError(field, f"renders longer than {max_chars} characters", part_id)
                    chunks.append(chunk)
            finally:
                stream.close()
    except _RenderDeadlinePassed:
        raise PromptError(field, "template takes too long to render", part_id) from None
    except MemoryError:
        raise PromptError(field, "template needs more memory than a render may use", part_id) from None
    except SecurityError as exc:
        raise PromptError(field, f"template refused by the sandbox: {exc}", part_id) from exc
    except TemplateError as exc:
        raise PromptError(field, f"template error: {exc.message or type(exc).__name__}", part_id) from exc
    return "".join(chunks)


# Renders run in processes of their own. A template is code its author wrote, and no sandbox rule bounds
# every way it can allocate (a string doubled in a loop, one join or format of a huge result): a render
# process has an address-space cap, so such a template meets a MemoryError there, and the API's own
# process is untouched. A burst of slow templates queues behind other renders, never on the event loop.
_RENDER_WORKERS = 2
# Bytes a render may allocate beyond a fresh worker's own. Outputs are capped at tens of thousands of
# characters, so this is room to spare, and two workers at their cap stay well inside the API container's
# memory limit (the chart's 512 MiB).
_RENDER_MEMORY_HEADROOM = 64 * 1024 * 1024
_render_pool: ProcessPoolExecutor | None = None


def _cap_memory(headroom: int) -> None:
    """A render worker's initializer: its address space is capped at what it maps now plus `headroom`."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + headroom if hard == resource.RLIM_INFINITY else min(mapped + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _render_processes() -> ProcessPoolExecutor:
    global _render_pool
    if _render_pool is None:
        # forkserver: workers fork from a single-threaded server process, never from the API's threads.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])  # imported once, in the server
        _render_pool = ProcessPoolExecutor(_RENDER_WORKERS, mp_context=context, initializer=_cap_memory,
                                           initargs=(_RENDER_MEMORY_HEADROOM,))
    return _render_pool


async def _in_render_process(function: Callable[..., _Result], /, *args: Any, **kwargs: Any) -> _Result:
    global _render_pool
    pool = _render_processes()
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(function, *args,
                                                                                        **kwargs))
    except BrokenProcessPool:
        # A worker died (killed from outside, or past its cap in C): the next render gets fresh workers.
        if _render_pool is pool:
            _render_pool = None
        pool.shutdown(wait=False, cancel_futures=True)
        raise RenderUnavailable("the template render process died; try again") from None


def _trial(source: str, variables: Mapping[str, Any], render_seconds: float, max_chars: int,
           field: str) -> None:
    # The clock starts in the render process, not while the render waits for one.
    render_template(source, variables, deadline=time.monotonic() + render_seconds, max_chars=max_chars,
                    field=field)


async def check_template(source: str, variables: Mapping[str, Any], *, render_seconds: float,
                         max_chars: int, field: str = "content") -> None:
    """Refuse, at write time, a template that does not parse or does not render with `variables` (shaped
    like compose's) within the budget: caught here, it never breaks a later compose."""
    await _in_render_process(_trial, source, dict(variables), render_seconds, max_chars, field)


# Unicode categories that render as nothing: format (Cf, which holds the tag characters and bidi
# controls), control (Cc), private use (Co), unassigned (Cn). Newline and tab stay.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Co", "Cn"})
_KEPT_CONTROLS = frozenset("\n\t")


def strip_invisible(text: str) -> str:
    return "".join(ch for ch in text
                   if ch in _KEPT_CONTROLS or unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)


# Blocks are delimited by <agentbox:SCOPE> ... </agentbox:SCOPE>; any look-alike inside org or user
# text loses its angle bracket so it can neither open nor close a block.
_DELIMITER_LOOKALIKE = re.compile(r"<(\s*/?\s*agentbox\s*:)", re.IGNORECASE)


def escape_delimiters(text: str) -> str:
    return _DELIMITER_LOOKALIKE.sub(r"&lt;\1", text)


def sanitise(text: str) -> str:
    return escape_delimiters(strip_invisible(unicodedata.normalize("NFKC", text)))


_INJECTION_PATTERNS: dict[str, re.Pattern[str]] = {
    "ignore-previous-instructions": re.compile(
        r"\b(ignore|disregard|forget|override)\b[^.\n]{0,40}\b(previous|prior|above|earlier|all|system)\b"
        r"[^.\n]{0,20}\b(instructions?|prompts?|rules|messages?)\b", re.IGNORECASE),
    "role-reassignment": re.compile(r"\byou are now\b|\bact as (the )?(system|developer|admin)",
                                    re.IGNORECASE),
    "prompt-exfiltration": re.compile(
        r"\b(reveal|print|show|repeat|output)\b[^.\n]{0,30}\b(system prompt|hidden instructions)\b",
        re.IGNORECASE),
    "block-delimiter": re.compile(r"<\s*/?\s*agentbox\s*:", re.IGNORECASE),
    "fake-role-marker": re.compile(r"^\s*(system|assistant|developer)\s*:", re.IGNORECASE | re.MULTILINE),
    "invisible-characters": re.compile(r"[\u200b-\u200f\u202a-\u202e\u2060-\u2064\U000e0000-\U000e007f]"),
}


def injection_signals(part: PromptPart, text: str) -> list[InjectionSignal]:
    return [InjectionSignal(part.id, part.scope, name)
            for name, pattern in _INJECTION_PATTERNS.items() if pattern.search(text)]


def ordered(parts: Iterable[PromptPart]) -> list[PromptPart]:
    """Global first, then org, then user; inside a scope the higher priority first, then by id."""
    return sorted(parts, key=lambda part: (SCOPE_ORDER[part.scope], -part.priority, part.id))


def content_version(parts: Iterable[PromptPart], variables: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for part in ordered(parts):
        digest.update(json.dumps([part.id, part.scope, part.priority, part.is_template, part.version,
                                  hashlib.sha256(part.content.encode()).hexdigest()]).encode())
    digest.update(json.dumps(variables, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def compose(parts: Iterable[PromptPart], variables: Mapping[str, Any], *, max_part_chars: int,
            max_total_chars: int, render_seconds: float) -> ComposedPrompt:
    """Blocking (templates render here, all of them within `render_seconds`): from the event loop, use
    `PromptCache.compose`."""
    parts = ordered(parts)
    deadline = time.monotonic() + render_seconds
    blocks: list[str] = []
    signals: list[InjectionSignal] = []
    for part in parts:
        field_name = f"prompts[{part.id}].content"
        if len(part.content) > max_part_chars:
            raise PromptError(field_name, f"longer than {max_part_chars} characters", part.id)
        if part.scope == "global":
            blocks.append(part.content)  # the platform's own block: first and unchanged
            continue
        signals.extend(injection_signals(part, part.content))
        rendered = (render_template(part.content, variables, deadline=deadline, max_chars=max_part_chars,
                                    field=field_name, part_id=part.id)
                    if part.is_template else part.content)
        body = sanitise(rendered)
        if len(body) > max_part_chars:
            raise PromptError(field_name, f"renders longer than {max_part_chars} characters", part.id)
        blocks.append(f"<agentbox:{part.scope}>\n{body}\n</agentbox:{part.scope}>")
    text = "\n\n".join(blocks)
    if len(text) > max_total_chars:
        raise PromptError("prompts", f"the composed prompt is longer than {max_total_chars} characters")
    return ComposedPrompt(text=text, version=content_version(parts, variables), signals=tuple(signals))


class PromptCache:
    """Composed prompts by content version (a hand-kept LRU: no cache library is among our dependencies)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._entries: OrderedDict[str, ComposedPrompt] = OrderedDict()
        self._max = max_entries
        self.hits = 0

    async def compose(self, parts: Iterable[PromptPart], variables: Mapping[str, Any], *,
                      max_part_chars: int, max_total_chars: int, render_seconds: float) -> ComposedPrompt:
        """The composed prompt, from the cache or composed in a render process (the loop never renders)."""
        parts = list(parts)
        key = content_version(parts, variables)
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return cached
        result = await _in_render_process(compose, parts, dict(variables), max_part_chars=max_part_chars,
                                          max_total_chars=max_total_chars, render_seconds=render_seconds)
        self._entries[key] = result
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return result

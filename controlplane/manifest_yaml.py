"""Reading a manifest someone handed us: YAML as Kubernetes takes it, in bounded time and memory.

- At most MAX_INPUT bytes of UTF-8 text are read.
- libyaml parses (when present: the pure-Python scanner is slow enough on a big scalar to be
  a denial of service); our composer builds the node tree and counts, as it goes, how much
  the aliases would add if expanded. An alias bomb (billion laughs) is refused once that
  passes MAX_INPUT, before any object is built; an alias inside its own anchor (a
  list that contains itself) is refused when it is met; nesting stops at MAX_DEPTH, the
  count of values at MAX_NODES.
- Only JSON's types come out: timestamps stay strings (as Kubernetes reads them), and the
  tags that make bytes, sets or pairs are refused.
Errors are `ManifestError`, one line naming the place.
"""

from __future__ import annotations

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, ScalarEvent
from yaml.resolver import Resolver

from controlplane.user_text import one_line

MAX_INPUT = 8 << 20  # bytes of one manifest, and the expanded weight of all its documents
MAX_DEPTH = 64  # nesting levels; Kubernetes objects need about a dozen
MAX_NODES = 250_000  # values in one manifest (about 12,000 DataVolumes); each costs some 300 bytes here
MAX_INT_DIGITS = 100  # no Kubernetes number needs more (int64 has 19 digits)
NODE_WEIGHT = 4  # what a node weighs besides its text, in bytes (so `[[],[],...]` weighs too)


class ManifestError(ValueError):
    """The manifest cannot be read; the message is one line naming where."""


try:  # libyaml's parser; the pure-Python one is the fallback
    from yaml.cyaml import CParser as _Parser

    def _init_parser(loader, text: str) -> None:
        _Parser.__init__(loader, text)
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        pass

    def _init_parser(loader, text: str) -> None:
        Reader.__init__(loader, text)
        Scanner.__init__(loader)
        Parser.__init__(loader)


def _refuse_tag(constructor, node):
    raise ConstructorError(None, None, f"the tag {node.tag} is not allowed in a Kubernetes object", node.start_mark)


class _ManifestLoader(Composer, _Parser, SafeConstructor, Resolver):
    """Our composer first in the MRO: libyaml's parser would otherwise compose by itself."""

    def __init__(self, text: str):
        _init_parser(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._weight = 0  # of everything composed so far, aliases expanded
        self._expanded = 0  # the part of it that aliases added
        self._nodes = 0
        self._anchor_weight: dict[str, int] = {}
        self._open_anchors: list[str] = []

    def _expand(self, amount: int, mark) -> None:
        """An alias adds a copy of its anchor's weight; the copies together stay under MAX_INPUT."""
        self._weight += amount
        self._expanded += amount
        if self._expanded > MAX_INPUT:
            raise ManifestError(f"{_where(mark)}: the aliases would expand the manifest by more than "
                                f"{MAX_INPUT >> 20} MiB (an alias bomb?)")

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self._open_anchors:
                raise ManifestError(f"{_where(event.start_mark)}: alias *{_short(event.anchor)} refers to its own "
                                    "anchor (an object containing itself)")
            self._expand(self._anchor_weight.get(event.anchor, 0), event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise ManifestError(f"{_where(event.start_mark)}: nested deeper than {MAX_DEPTH} levels")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise ManifestError(f"{_where(event.start_mark)}: more than {MAX_NODES:,} values in one manifest")
        anchor = getattr(event, "anchor", None)
        before = self._weight
        self._weight += NODE_WEIGHT + (len(event.value) if isinstance(event, ScalarEvent) else 0)
        self._depth += 1
        if anchor:
            self._open_anchors.append(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor:
                self._open_anchors.pop()
        if anchor:
            self._anchor_weight[anchor] = self._weight - before
        return node

    def construct_mapping(self, node, deep=False):
        """A key given twice is refused (Kubernetes' strict decoding), not silently the last."""
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:str" and key_node.value != "<<":
                if key_node.value in seen:
                    raise ConstructorError(None, None, f"the key {_short(key_node.value)!r} is given twice",
                                           key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _bounded_int(constructor, node):
    """An integer of at most MAX_INT_DIGITS characters (Python refuses to read past 4,300
    digits, naming its own setting rather than the document)."""
    if len(node.value) > MAX_INT_DIGITS:
        raise ManifestError(f"{_where(node.start_mark)}: a number of {len(node.value):,} characters "
                            f"(at most {MAX_INT_DIGITS} are read)")
    return SafeConstructor.construct_yaml_int(constructor, node)


_ManifestLoader.add_constructor("tag:yaml.org,2002:timestamp", SafeConstructor.construct_yaml_str)
_ManifestLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)
for _tag in ("binary", "set", "omap", "pairs"):
    _ManifestLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)


def _short(text: str, limit: int = 40) -> str:
    return one_line(text, limit)


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"


def decode(data: bytes) -> str:
    if len(data) > MAX_INPUT:
        raise ManifestError(f"the manifest is larger than {MAX_INPUT >> 20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text (byte {exc.start}): a manifest is YAML or JSON") from None


def read_manifest(path: str) -> str:
    """The text of a manifest file ("-": standard input), at most MAX_INPUT bytes."""
    import sys

    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_INPUT + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read {_short(path, 200)}: {exc.strerror or 'unreadable'}") from None
    return decode(data)


def load_all(text: str) -> list[tuple[int, object]]:
    """(document number, data) of every non-empty document."""
    if len(text) > MAX_INPUT:
        raise ManifestError(f"the manifest is larger than {MAX_INPUT >> 20} MiB")
    loader = _ManifestLoader(text)
    out: list[tuple[int, object]] = []
    number = 0
    try:
        while loader.check_node():
            number += 1
            data = loader.construct_document(loader.get_node())
            if data is not None:
                out.append((number, data))
    except ManifestError as exc:
        raise ManifestError(f"document {max(number, 1)}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        raise ManifestError(f"not valid YAML: {_where(mark)}: {_short(problem, 160)}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"not valid YAML: {_short(str(exc), 160)}") from None
    except RecursionError:  # the depth limit above comes first; this is the last resort
        raise ManifestError(f"document {max(number, 1)}: nested too deeply") from None
    finally:
        loader.dispose()
    return out

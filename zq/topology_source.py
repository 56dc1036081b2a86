"""Where things are in a topology file: `SourceMap`, a small scanner over the raw TOML text that
records the line of every table header and of every key inside it (skipping strings, comments and
multi-line arrays), so that zq.topology's checks can say `FILE:LINE` for the exact key.
"""
from __future__ import annotations

import re


# ============================================================================================
# Where things are in the file
# ============================================================================================

Section = tuple[str, int]   # ("cluster", 0), ("topic", 2): the third [[topic]]
KeyPath = tuple[str, ...]   # ("backoff", "initial")

_BARE_KEY = r"[A-Za-z0-9_-]+"
_QUOTED_KEY = r"\"(?:[^\"\\]|\\.)*\"|'[^']*'"
_KEY_PART = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_KEY_LINE = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_ARRAY_HEADER = re.compile(rf"^\s*\[\[\s*({_DOTTED_KEY})\s*\]\]")
_TABLE_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED_KEY})\s*\]")
_KEY_PART_RE = re.compile(_KEY_PART)


def _key_parts(text: str) -> KeyPath:
    parts = []
    for match in _KEY_PART_RE.finditer(text):
        part = match.group(0)
        if part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


class SourceMap:
    """Line numbers (1-based) of table headers and keys in a TOML text.

    Only what the topology format uses is tracked: top-level tables and arrays of tables, their
    sub-tables (`[topic.backoff]` belongs to the latest `[[topic]]`) and their keys, dotted or
    not. A value that spans lines (a multi-line array or string) is skipped as a whole."""

    def __init__(self, text: str) -> None:
        self.headers: dict[Section, int] = {}
        self.keys: dict[tuple[Section, KeyPath], int] = {}
        self._scan(text)

    def line(self, section: Section, key: KeyPath = ()) -> int:
        """The line of `key` in `section`, else of its nearest enclosing key, else of the header."""
        for n in range(len(key), 0, -1):
            found = self.keys.get((section, key[:n]))
            if found is not None:
                return found
        if section == ("", 0) and key and (key[0], 0) in self.headers:
            return self.headers[(key[0], 0)]  # a top-level key written as a [table] or [[table]] header
        if section not in self.headers:
            # a table written inline at the top level, `node = [{...}]`: the line of its key
            return self.keys.get((("", 0), (section[0],)), 1)
        return self.headers[section]

    def _scan(self, text: str) -> None:
        counts: dict[str, int] = {}
        section: Section = ("", 0)
        prefix: KeyPath = ()
        depth, open_string = 0, None
        for number, line in enumerate(text.splitlines(), start=1):
            if depth or open_string:
                depth, open_string = _scan_value(line, 0, depth, open_string)
                continue
            if match := _ARRAY_HEADER.match(line):
                parts = _key_parts(match.group(1))
                if len(parts) == 1:
                    counts[parts[0]] = counts.get(parts[0], -1) + 1
                    section, prefix = (parts[0], counts[parts[0]]), ()
                    self.headers.setdefault(section, number)
                else:
                    section, prefix = (parts[0], max(counts.get(parts[0], 0), 0)), parts[1:]
                    self.keys.setdefault((section, prefix), number)
            elif match := _TABLE_HEADER.match(line):
                parts = _key_parts(match.group(1))
                if len(parts) == 1 and parts[0] not in counts:
                    section, prefix = (parts[0], 0), ()
                    self.headers.setdefault(section, number)
                else:
                    section, prefix = (parts[0], max(counts.get(parts[0], 0), 0)), parts[1:]
                    self.keys.setdefault((section, prefix), number)
            elif match := _KEY_LINE.match(line):
                self.keys.setdefault((section, prefix + _key_parts(match.group(1))), number)
                depth, open_string = _scan_value(line, match.end(), 0, None)


def _scan_value(line: str, start: int, depth: int, open_string: str | None) -> tuple[int, str | None]:
    """Bracket depth and open multi-line string delimiter after reading `line[start:]`."""
    i = start
    while i < len(line):
        if open_string:
            end = line.find(open_string, i)
            if end < 0:
                return depth, open_string
            i, open_string = end + 3, None
            continue
        char = line[i]
        if char == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            open_string, i = line[i:i + 3], i + 3
        elif char == '"':
            i = _string_end(line, i + 1, '"', escapes=True)
        elif char == "'":
            i = _string_end(line, i + 1, "'", escapes=False)
        else:
            depth += char in "[{"
            depth -= char in "]}"
            i += 1
    return max(depth, 0), open_string


def _string_end(line: str, i: int, quote: str, *, escapes: bool) -> int:
    while i < len(line):
        if escapes and line[i] == "\\":
            i += 2
        elif line[i] == quote:
            return i + 1
        else:
            i += 1
    return i

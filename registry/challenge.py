"""Parse ``WWW-Authenticate`` challenges (RFC 7235) as registries send them.

Registries answer an unauthenticated request with one or more challenges such as
``Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"``
or ``Basic realm="basic-realm"``.  Parameters may be quoted strings with backslash escapes
or bare tokens, and several challenges may share one header separated by commas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: a lower-cased scheme and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def skip_separators(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t,":
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TOKEN_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def bare_value(self) -> str:
        """An unquoted parameter value; lenient (up to a comma or blank) since some servers skip quotes."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in " \t,":
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        # Caller checked that the current character is a double quote.
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if ch == '"':
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise ValueError("unterminated quoted string in WWW-Authenticate header")


def parse_challenges(header: str) -> list[Challenge]:
    """Return every challenge in a ``WWW-Authenticate`` header value, in order.

    Raises ValueError on a header that cannot be parsed, so callers can report it.
    """
    scanner = _Scanner(header)
    challenges: list[Challenge] = []
    scanner.skip_separators()
    while scanner.peek():
        scheme = scanner.token()
        if not scheme:
            raise ValueError(f"malformed WWW-Authenticate header at offset {scanner.pos}")
        params: dict[str, str] = {}
        scanner.skip_space()
        while scanner.peek():
            mark = scanner.pos
            name = scanner.token()
            scanner.skip_space()
            if not name or scanner.peek() != "=":
                scanner.pos = mark
                break
            scanner.pos += 1
            scanner.skip_space()
            value = scanner.quoted() if scanner.peek() == '"' else scanner.bare_value()
            params[name.lower()] = value
            scanner.skip_space()
            if scanner.peek() != ",":
                break
            scanner.skip_separators()
            # A comma followed by "name=" continues this challenge; anything else starts the next one.
            mark = scanner.pos
            probe = scanner.token()
            scanner.skip_space()
            is_param = bool(probe) and scanner.peek() == "="
            scanner.pos = mark
            if not is_param:
                break
        challenges.append(Challenge(scheme.lower(), params))
        scanner.skip_separators()
    return challenges

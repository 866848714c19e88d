"""The argument parser of the qaa-* commands: help that shows every default and the choices,
`--version`, and a bad invocation answered with one line and exit status 2.

Only the standard library is imported here, so a command can refuse bad arguments before it
imports torch or loads a model. (`qaa-loadtest` keeps a copy of the two classes: it speaks
only HTTP and imports nothing of the other packages.)
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version as _dist_version


def version() -> str:
    try:
        return _dist_version("qaa-serve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default (not None, False
    or empty), and keeps the description's line breaks (usage examples)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "%(default)" in text or not action.option_strings or d is argparse.SUPPRESS or d is None \
                or d is False or d == [] or d == "":
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, **kw):
        super().__init__(prog=prog, formatter_class=HelpFormatter, **kw)
        self.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                          help="print the version and exit")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type = int, lo: float | None = None, hi: float | None = None):
    """An argparse type: `kind` within [lo, hi]; the message names the bound that failed."""

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if x != x or x in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and x < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        if hi is not None and x > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        return x

    parse.__name__ = kind.__name__
    return parse


def one_of(what: str, options, many: bool = False):
    """An argparse type: one of `options` (or, with many=True, a comma-separated list of
    them); the message names the unknown value and lists the options."""

    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()] if many else [text]
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given (one of {', '.join(options)})")
        for x in items:
            if x not in options:
                raise argparse.ArgumentTypeError(f"unknown {what} {x!r} (one of {', '.join(options)})")
        return items if many else text

    parse.__name__ = what
    return parse


def listed(options) -> str:
    """A metavar that lists the options, as argparse's `choices` would show them."""
    return "{" + ",".join(options) + "}"

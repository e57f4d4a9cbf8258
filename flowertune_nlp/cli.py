"""The argument parser every command of this project uses: argparse, with the closest known
flags suggested for a mistyped one (Python 3.11's argparse suggests nothing)."""

from __future__ import annotations

import argparse
import difflib
import re


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's error (usage, exit 2), plus "did you mean" for unrecognized flags."""
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [o for action in self._actions for o in action.option_strings]
            hints = []
            for flag in unknown.group(1).split():
                close = difflib.get_close_matches(flag.split("=")[0], known, n=2, cutoff=0.6)
                if flag.startswith("-") and close:
                    hints.append(f"{flag}: did you mean {' or '.join(close)}?")
            if hints:
                message += "; " + "; ".join(hints)
        super().error(message)

"""yeastarfs(1), the man page, in roff: the options from their declarations (config.OPTIONS),
the rest from the command parsers' own descriptions and examples, so the page says what
``--help`` and the README say. ``yeastarfs man > yeastarfs.1; man ./yeastarfs.1``.

Owns only the roff rendering; knows nothing the parsers or the declarations do not say.
"""

from __future__ import annotations

import argparse
import re

from yeastarfs import __version__
from yeastarfs.config import OPTIONS, PASSWORD_ENV, Option

_CODE = re.compile(r"`([^`]*)`")


def render(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser]) -> str:
    """The page for *parser* (the ``yeastarfs`` parser) with its sub-*commands* by name."""
    mount = commands["mount"]
    lines = [f'.TH YEASTARFS 1 "" "yeastarfs {__version__}" "User Commands"',
             ".SH NAME", r"yeastarfs \- " + _roff(parser.description or ""),
             ".SH SYNOPSIS",
             r".B yeastarfs mount", r".I MOUNTPOINT", r"\fB\-\-pbx\fR \fIURL\fR \fB\-\-user\fR \fINAME\fR"
             r" [\fIOPTION\fR]...", ".br",
             r".B mount \-t fuse.yeastarfs", r"\fIURL MOUNTPOINT\fR \fB\-o\fR \fIname\fR[=\fIvalue\fR],...", ".br",
             r".B yeastarfs", r"\fICOMMAND\fR [\fIARGUMENT\fR]...",
             ".SH DESCRIPTION", *_paragraphs(mount.description or ""),
             ".SH OPTIONS",
             "Each option also has an", r"\fB\-o\fR", "spelling, a", r"\fBYEASTARFS_\fR\fINAME\fR",
             "environment variable and a config file key, listed under it.",
             "The command line wins, then the environment, then the file."]
    group = None
    for option in OPTIONS:
        if option.group != group:
            group = option.group
            lines += [f".SS {_roff(group)}"]
        lines += _option(option)
    lines += [".SH COMMANDS"]
    for name, command in commands.items():
        if name != "mount":
            usage = " ".join(command.format_usage().replace("usage: ", "", 1).split())
            lines += [".TP", rf"\fB{_roff(usage)}\fR", *_paragraphs(command.description or "")]
    lines += [".SH ENVIRONMENT",
              ".TP", rf"\fB{PASSWORD_ENV}\fR", "The PBX's API password, unless a password file is given.",
              ".TP", r"\fBYEASTARFS_\fR\fINAME\fR", "Any option above, by its name in capitals.",
              ".TP", r"\fBXDG_CACHE_HOME\fR, \fBHOME\fR", "Where the default cache directory is.",
              ".SH FILES",
              ".TP", r"\fI/etc/yeastarfs/config.toml\fR, \fI~/.config/yeastarfs/config.toml\fR",
              r"Default config files (TOML), read when \fB\-\-config\fR is not given.",
              ".TP", r"\fICACHE_DIR/yeastarfs.log\fR", "The log of a mount in the background.",
              ".SH EXAMPLES", ".nf", *[_roff(line) for line in (mount.epilog or "").splitlines()], ".fi",
              ".SH SEE ALSO", r"\fBmount\fR(8), \fBfstab\fR(5), \fBfusermount3\fR(1)"]
    return "\n".join(lines) + "\n"


def _option(option: Option) -> list[str]:
    value = rf"\fI{_roff(option.metavar)}\fR" if option.takes_value else ""
    head = rf"\fB{_roff(option.flag)}\fR" + (" " + value if value else "")
    if option.short:
        head += rf", \fB{_roff(option.short)}\fR"
    spellings = [rf"\fB\-o {_roff(option.o_key)}\fR" + ("=" + value if value else ""),
                 rf"\fB{_roff(option.env)}\fR=" + (value or "true"),
                 *(["config file " + " or ".join(rf"\fB{_roff(key)}\fR" for key in option.file_keys)]
                   if option.file_keys else [])]
    default = {"–": [], "required": [".br", "Required."]}.get(
        option.default_markdown, [".br", f"Default: {_roff(option.default_markdown)}."])
    return [".TP", head, _roff(option.help.rstrip(".") + "."), *default, ".br", ", ".join(spellings) + "."]


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs of a parser's description, as roff paragraphs."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        if out:
            out.append(".PP")
        out.append(_roff(" ".join(paragraph.split())))
    return out


def _roff(text: str) -> str:
    """Plain or `code`-marked text as roff: escapes, `code` in bold, no line starting with a dot,
    non-ASCII characters as named glyphs (troff reads its input as Latin-1)."""
    escaped = text.replace("\\", r"\e").replace("-", r"\-")
    escaped = "".join(c if ord(c) < 128 else rf"\[u{ord(c):04X}]" for c in escaped)
    escaped = _CODE.sub(lambda match: rf"\fB{match.group(1)}\fR", escaped)
    return "\n".join(r"\&" + line if line.startswith((".", "'")) else line for line in escaped.split("\n"))

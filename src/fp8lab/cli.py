"""fp8lab's command line: parse, build, call. One module per verb in fp8lab/commands/."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys

import fp8lab
import fp8lab.commands
from fp8lab.errors import FP8LabError


def _command_modules() -> list:
    mods = [importlib.import_module(f"fp8lab.commands.{m.name}")
            for m in pkgutil.iter_modules(fp8lab.commands.__path__)]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> tuple[argparse.ArgumentParser, set[str]]:
    p = argparse.ArgumentParser(prog="fp8lab", description="Train LMs in BF16 and FP8; find out whether FP8 pays.")
    p.add_argument("--version", action="version", version=f"fp8lab {fp8lab.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    takes_overrides = set()
    for mod in _command_modules():
        before = set(sub.choices)
        mod.register(sub)
        if getattr(mod, "TAKES_OVERRIDES", False):
            takes_overrides |= set(sub.choices) - before
    return p, takes_overrides


def main(argv: list[str] | None = None) -> int:
    parser, takes_overrides = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for records such as compare's
    if rest and args.command not in takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        code = args.fn(args, rest)
        sys.stdout.flush()  # a reader gone early shows here, inside the handler below, not at exit
        return code
    except FP8LabError as e:
        print(f"fp8lab: {e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP while a child ran (procs.Interrupted)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"fp8lab: {args.command} interrupted ({signal.Signals(signum).name})"
              + ("; the newest complete checkpoint resumes the run" if args.command == "train" else ""),
              file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # The reader of our output went away (`fp8lab advise --json | head`): nothing is wrong
        # here. Point stdout at /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

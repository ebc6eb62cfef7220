"""One module per CLI verb. Each defines `register(subparsers)`, which adds its parser and
sets `fn(args, rest) -> int`; cli.py discovers them, so a new verb touches no other file.
Heavy imports (torch) happen inside `fn`, so `fp8lab --help` stays fast."""

"""Extra subcommands. Each module here defines

    def register(subparsers) -> None   # adds its parser and sets defaults(func=run)

where `run(args) -> int`. `segadapt.cli` discovers them, so a new command needs
no edit of cli.py. Keep imports inside `run` so `segadapt --help` stays fast.
"""

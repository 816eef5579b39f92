"""`segadapt config show -c X [overrides]`: the resolved config, each value with where it came from."""
from __future__ import annotations

from pathlib import Path

import yaml


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="show a resolved config and where each value came from")
    p.add_argument("action", choices=("show",), help="show: print the resolved config")
    p.add_argument("-c", "--config", default=None,
                   help="config file or packaged name (default: the train command's default); a run's "
                        "config.yaml works too")
    p.add_argument("--changed", action="store_true", help="only the values a file or the command line set")
    p.add_argument("--seed", type=int, default=None, help="as `train --seed`")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for train")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..cli import DEFAULT_CONFIG
    from ..config import PACKAGE_CONFIG_DIR, load_config

    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    origins: dict = {}
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides, origins_out=origins)
    packaged = str(PACKAGE_CONFIG_DIR.resolve())

    def shown(where: str) -> str:
        if where.startswith(packaged):
            return f"{Path(where).relative_to(packaged).as_posix()} (packaged)"
        try:
            return str(Path(where).relative_to(Path.cwd()))
        except ValueError:
            return where

    def where(key: str) -> str | None:
        # exact keys only: a section's own origin says where it was first named, not who set its keys
        if key in origins:
            return shown(origins[key])
        if key.endswith(".enabled") and key[: -len(".enabled")] in origins:  # `mic: true`
            return shown(origins[key[: -len(".enabled")]])
        return None

    lines = [f"# config {args.config or DEFAULT_CONFIG}" + (f" with {' '.join(overrides)}" if overrides else ""),
             "# each value: # where it was set (default: the dataclass default; method keys: the method's)"]

    def emit(node: dict, prefix: str, indent: int) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                if args.changed and not any(str(o).startswith(key + ".") or o == key
                                            for o in origins if isinstance(o, str)):
                    continue
                lines.append(f"{' ' * indent}{k}:")
                emit(v, key + ".", indent + 2)
                continue
            origin = where(key)
            if args.changed and origin is None:
                continue
            text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
            if text.endswith("\n..."):
                text = text[:-4].strip()
            text = text.removesuffix("...").strip()
            note = origin or "default"
            ref = origins.get(("ref", key))
            if ref is not None:
                note += f", from {ref}"
            lines.append(f"{' ' * indent}{k}: {text}  # {note}")

    emit(cfg.to_dict(), "", 0)
    print("\n".join(lines))
    return 0

#!/usr/bin/env python
"""Generate a test CA, the SuperLink's TLS certificate and SuperNode auth keys for a Flower
federation (the same as ``mira flower certs``).

    python scripts/flower_certs.py --out certs --nodes 3 [--host server.example.org ...]
"""
from __future__ import annotations

import argparse
import sys

from mira.errors import MiraError
from mira.federated.flower.certs import DEFAULT_HOSTS, generate_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="certs")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--host", action="append", default=[], help="SuperLink name or IP (repeatable)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        files = generate_all(args.out, args.nodes, args.host or list(DEFAULT_HOSTS), overwrite=args.overwrite)
    except MiraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"CA {files['ca']}; SuperLink {files['server_cert']} {files['server_key']}")
    for priv, pub in files["nodes"]:
        print(f"SuperNode key {priv} (public {pub})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

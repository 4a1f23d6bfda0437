"""The tested-versions lock (constraints.txt): write it from a green environment, or compare an environment with it.

    python .ci/lockfile.py write FREEZE constraints.txt --torch 2.13.0+cpu   # FREEZE: `pip freeze --all` output
    python .ci/lockfile.py diff FREEZE constraints.txt [--check]             # a markdown table of what changed

torch is never pinned in the lock: it is installed first, by hand (the CPU wheel here, the CUDA build you want on a
GPU machine), and a pin would make pip replace a user's CUDA build. The project itself is left out too.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import sys
from pathlib import Path

NOT_LOCKED = {"calibprune", "torch"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """``{canonical name: (name as written, version)}`` of every ``name==version`` line; other lines (comments,
    editable installs, direct references) are skipped."""
    pins = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = (match.group(1), match.group(2))
    return pins


def write_lock(freeze: Path, out: Path, torch_version: str) -> int:
    pins = {k: v for k, v in read_pins(freeze).items() if k not in NOT_LOCKED}
    header = [
        "# calibprune's tested versions: every dependency that CI last ran green with (written by .ci/drift",
        "# --refresh-lock from that run's environment; do not edit by hand). Install through it:",
        "#   pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt --no-build-isolation -e .",
        f"# Resolved {dt.date.today().isoformat()} on CPython {platform.python_version()}, {platform.system()} "
        f"{platform.machine()}, with torch {torch_version} installed first.",
        "# torch is not pinned here (install it first; a pin would make pip replace a CUDA build). A CUDA build of",
        "# torch pins its own triton: with one, leave the triton line out (grep -v '^triton==' constraints.txt).",
    ]
    body = [f"{name}=={version}" for _, (name, version) in sorted(pins.items())]
    out.write_text("\n".join(header + body) + "\n")
    return len(body)


def diff_table(freeze: Path, lock: Path) -> tuple[str, int]:
    """A markdown table of the packages whose version differs between ``lock`` and ``freeze``, and its row count."""
    now = {k: v for k, v in read_pins(freeze).items() if k not in NOT_LOCKED}
    locked = read_pins(lock) if lock.exists() else {}
    rows = []
    for key in sorted(set(now) | set(locked)):
        old = locked.get(key, (None, "—"))[1]
        new = now.get(key, (None, "—"))[1]
        if old != new:
            name = (now.get(key) or locked.get(key))[0]
            rows.append(f"| {name} | {old} | {new} |")
    if not rows:
        return "Every package is at its locked version.\n", 0
    return "| package | locked | newest here |\n|---|---|---|\n" + "\n".join(rows) + "\n", len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    write = sub.add_parser("write")
    write.add_argument("freeze", type=Path)
    write.add_argument("out", type=Path)
    write.add_argument("--torch", required=True, help="the torch version installed first (for the header)")
    diff = sub.add_parser("diff")
    diff.add_argument("freeze", type=Path)
    diff.add_argument("lock", type=Path)
    diff.add_argument("--check", action="store_true", help="exit 1 if anything differs (CI: the lock is complete)")
    args = parser.parse_args(argv)
    if args.verb == "write":
        print(f"wrote {write_lock(args.freeze, args.out, args.torch)} pins to {args.out}")
    else:
        table, changed = diff_table(args.freeze, args.lock)
        sys.stdout.write(table)
        if args.check and changed:
            print(f"{changed} installed version(s) differ from {args.lock}: the lock is incomplete or stale; "
                  "refresh it from a green run with .ci/drift --refresh-lock", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

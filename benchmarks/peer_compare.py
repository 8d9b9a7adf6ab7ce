"""Side by side: the figures of several ``peer_bench.py`` result files (one engine or tree
each, same model and workloads), each against the first.

    python benchmarks/peer_compare.py [--tolerance PCT] NAME=FILE.json NAME=FILE.json ...

With ``--tolerance`` it is the A/B's check: the status is 1 when a later file is worse
than the first by more than PCT percent in any workload figure (start-up time is shown
but not checked: it measures the machine's file cache and compilers more than the code).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One number of a result file and which way is better."""
    label: str
    unit: str
    higher_is_better: bool
    checked: bool = True

    def worse_by_pct(self, base: float, value: float) -> float:
        """How much worse ``value`` is than ``base``, in percent (negative: better)."""
        change = (value - base) / base * 100
        return -change if self.higher_is_better else change


FIGURES = {
    "nano": Figure("nano", "out tok/s", higher_is_better=True),
    "single": Figure("single", "ms/token", higher_is_better=False),
    "prefix": Figure("prefix", "s", higher_is_better=False),
    "long": Figure("long", "s", higher_is_better=False),
    "ctx": Figure("ctx", "s", higher_is_better=False),
    "startup": Figure("start-up", "s", higher_is_better=False, checked=False),
}


def figures_of(result: dict) -> dict[str, float]:
    """The workload figures a peer_bench.py result holds, by workload name."""
    out = {}
    if "nano" in result:
        out["nano"] = result["nano"]["output_tok_s"]
    if "single_ms_per_token" in result:
        out["single"] = result["single_ms_per_token"]
    for name in ("prefix", "long", "ctx"):
        if name in result:
            out[name] = result[name]["wall_s"]
    if "startup_s" in result:
        out["startup"] = result["startup_s"]
    return out


def compare(named: list[tuple[str, dict]], tolerance: float | None) -> tuple[list[str], bool]:
    """Table lines, and whether every checked figure is within ``tolerance`` of the first's."""
    names = [name for name, _ in named]
    values = [figures_of(result) for _, result in named]
    lines = [" | ".join(["figure", "unit", *names, *(f"{n} vs {names[0]}" for n in names[1:])])]
    ok = True
    for key, fig in FIGURES.items():
        if not any(key in v for v in values):
            continue
        row = [fig.label, fig.unit] + [f"{v[key]:,.2f}" if key in v else "-" for v in values]
        base = values[0].get(key)
        for v in values[1:]:
            if base is None or key not in v:
                row.append("-")
                ok = ok and not (tolerance is not None and fig.checked)
                continue
            worse = fig.worse_by_pct(base, v[key])
            flag = ""
            if tolerance is not None and fig.checked and worse > tolerance:
                flag, ok = f" WORSE by more than {tolerance:g}%", False
            row.append(f"{'+' if worse <= 0 else '-'}{abs(worse):.1f}%{flag}")
        lines.append(" | ".join(row))
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", metavar="NAME=FILE.json")
    p.add_argument("--tolerance", type=float, default=None, metavar="PCT")
    args = p.parse_args(argv)
    named = []
    for item in args.files:
        name, _, path = item.rpartition("=")
        try:
            with open(path) as f:
                named.append((name or path, json.load(f)))
        except OSError as e:
            print(f"{path}: {e.strerror}", file=sys.stderr)
            return 1
    models = {r.get("model") for _, r in named}
    lines, ok = compare(named, args.tolerance)
    print(f"model: {', '.join(sorted(map(str, models)))}   (+: better than {named[0][0]}, -: worse)")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Are two runs' results the same? Compares two metrics.jsonl files row by row and field by field,
ignoring wall-clock fields (the only ones that may differ between identical runs).

    python scripts/compare_metrics.py runs/a/metrics.jsonl runs/b/metrics.jsonl [--added-ok]

Prints each differing round with (first, second) values and a last line IDENTICAL or "N rows
differ"; exits 1 when they differ. A refactor that claims "same results" shows IDENTICAL against a
run of the code before it, on the same machine (float rounding differs between CPUs).

With --added-ok, keys only the second run has (a new metric, also inside nested records such as
HierFedLoRA's `groups`) are listed once and not counted: every value the first run wrote must still
be there, unchanged.
"""

import json
import sys


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if "wall" not in k} for line in f if line.strip()]


def strip_added(a, b, added: set[str], where: str = ""):
    """`b` without the dict keys `a` lacks (recording them in `added`), recursively."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in b.keys() - a.keys():
            added.add(where + k)
        return {k: strip_added(a[k], b[k], added, f"{where}{k}.") for k in b if k in a}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [strip_added(x, y, added, where) for x, y in zip(a, b)]
    return b


def main(a_path: str, b_path: str, added_ok: bool = False) -> int:
    a, b = rows(a_path), rows(b_path)
    if len(a) != len(b):
        print(f"{len(a)} rows against {len(b)}")
        return 1
    added: set[str] = set()
    if added_ok:
        b = [strip_added(ra, rb, added) for ra, rb in zip(a, b)]
    bad = 0
    for ra, rb in zip(a, b):
        if ra != rb:
            bad += 1
            print("round", ra.get("round"), {k: (ra.get(k), rb.get(k)) for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)})
    if added:
        print("keys only the second has:", ", ".join(sorted(added)))
    print("IDENTICAL" if not bad else f"{bad} rows differ", f"({len(a)} rows)")
    return 1 if bad else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--added-ok"]
    if len(args) != 2:
        sys.exit(__doc__)
    sys.exit(main(args[0], args[1], added_ok="--added-ok" in sys.argv))

"""Are two runs' results the same? Compares two metrics.jsonl files row by row and field by field,
ignoring wall-clock fields (the only ones that may differ between identical runs).

    python scripts/compare_metrics.py runs/a/metrics.jsonl runs/b/metrics.jsonl

Prints each differing round with (first, second) values and a last line IDENTICAL or "N rows
differ"; exits 1 when they differ. A refactor that claims "same results" shows IDENTICAL against a
run of the code before it, on the same machine (float rounding differs between CPUs).
"""

import json
import sys


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if "wall" not in k} for line in f if line.strip()]


def main(a_path: str, b_path: str) -> int:
    a, b = rows(a_path), rows(b_path)
    if len(a) != len(b):
        print(f"{len(a)} rows against {len(b)}")
        return 1
    bad = 0
    for ra, rb in zip(a, b):
        if ra != rb:
            bad += 1
            print("round", ra.get("round"), {k: (ra.get(k), rb.get(k)) for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)})
    print("IDENTICAL" if not bad else f"{bad} rows differ", f"({len(a)} rows)")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))

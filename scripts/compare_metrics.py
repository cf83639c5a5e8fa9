"""Compare a run's metrics.jsonl with the golden one, field by field (wall time excluded)."""
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
assert len(a) == len(b), (len(a), len(b))
bad = 0
for ra, rb in zip(a, b):
    ka = {k: v for k, v in ra.items() if "wall" not in k}
    kb = {k: v for k, v in rb.items() if "wall" not in k}
    if ka != kb:
        bad += 1
        print("DIFF round", ra.get("round"), {k: (ka.get(k), kb.get(k)) for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)})
print("IDENTICAL" if not bad else f"{bad} rows differ", f"({len(a)} rows)")

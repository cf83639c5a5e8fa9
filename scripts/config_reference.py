"""Regenerate the configuration reference in README.md from the schema (keeps the docs true)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hierfedlora.config import ExperimentConfig

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def reference() -> str:
    cfg = ExperimentConfig()
    out = []
    for section in ("run", "model", "data", "partition", "fleet", "train", "privacy", "tracking"):
        model = type(getattr(cfg, section))
        out += [f"`[{section}]`", "", "| key | default | meaning |", "|---|---|---|"]
        for key, field in model.model_fields.items():
            default = field.default if field.default_factory is None else field.default_factory()
            out.append(f"| `{key}` | `{default!r}` | {field.description or ''} |")
        out.append("")
    return "\n".join(out).strip()


def main() -> int:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{reference()}\n{END}", text, flags=re.S)
    if "--check" in sys.argv:
        return 0 if new == text else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

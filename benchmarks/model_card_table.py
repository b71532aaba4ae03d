"""Regenerate the evaluation table of docs/model_card.md with ``igtv-node evaluate``'s code.

Usage::

    python benchmarks/model_card_table.py DATA_DIR [DATA_DIR ...] [--checkpoint PATH]
        [--extra NAME=PATH ...] [--json OUT.json] [--card docs/model_card.md] [--block eval-table]

Runs :func:`pipeline.evaluation.run_evaluation` (the shipped model by default,
the SUV-40% baseline, and each ``--extra`` checkpoint: the ablations) and
replaces the text between ``<!-- BLOCK -->`` and ``<!-- /BLOCK -->`` in the
model card (default block: ``eval-table``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def replace_block(text: str, block: str, name: str = "eval-table") -> str:
    """Put ``block`` between the ``<!-- name -->`` and ``<!-- /name -->`` markers of ``text`` (they must exist)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"model card lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def main() -> None:
    from pipeline.evaluation import run_evaluation

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--extra", action="append", default=[], help="NAME=PATH of a further checkpoint")
    ap.add_argument("--roi", action="append", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--card", type=Path, default=ROOT / "docs" / "model_card.md")
    ap.add_argument("--block", default="eval-table", help="name of the card's marked block to replace")
    a = ap.parse_args()
    extra = dict(e.split("=", 1) for e in a.extra)
    res = run_evaluation(a.data, checkpoint=a.checkpoint, roi_names=a.roi or ["IGTV", "ITV"], baselines=True,
                         out=a.json, extra={k: Path(v) for k, v in extra.items()})
    cases = len(res["cases"])
    block = (f"{res['table']}\n\n{cases} held-out studies ({', '.join(str(p) for p in a.data)}); "
             f"models: " + ", ".join(f"{k} = `{v}`" for k, v in res["versions"].items()) + ".")
    a.card.write_text(replace_block(a.card.read_text(), block, a.block))
    print(f"updated {a.card}")


if __name__ == "__main__":
    main()

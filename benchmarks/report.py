"""What every benchmark here shares: its command line and how it reports."""
from __future__ import annotations

import argparse
import json


def arguments(doc: str, quick: str = "finish in well under 60 s") -> argparse.ArgumentParser:
    """The parser every benchmark starts from: --json and --quick."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def emit(out: dict, as_json: bool) -> None:
    """One JSON object on one line, or a table for people."""
    if as_json:
        print(json.dumps(out))
        return
    for key, value in out.items():
        if isinstance(value, dict):
            for k, v in value.items():
                print(f"  {key}.{k:<26} {_cell(v)}")
        else:
            print(f"{key:<30} {_cell(value)}")


def _cell(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:14,.3f}"

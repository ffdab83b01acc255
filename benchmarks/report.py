"""What every benchmark here shares: its command line and how it reports."""
from __future__ import annotations

import argparse
import json
import os
import platform


def arguments(doc: str, quick: str = "finish in well under 60 s") -> argparse.ArgumentParser:
    """The parser every benchmark starts from: --json and --quick."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def host() -> dict:
    """The machine a run's figures came from. The project's machines have
    changed under it (session 49: the echo's round trip doubled; session
    57: a slower virtual machine again), so each object says which."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor()
    if "cpu family" in info:  # a virtual machine's name may be the vendor's alone
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)),
            "kernel": platform.release(), "python": platform.python_version()}


def emit(out: dict, as_json: bool) -> None:
    """One JSON object on one line, or a table for people; with the host
    it ran on (`host`)."""
    out = {**out, "host": host()}
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
    if isinstance(v, int):
        return f"{v:14,d}"
    return f"{v:14,.3f}"

"""A minimal junit XML writer for the ladder's own drivers (smoke_ops.py, sanitize_ops.py), so
that the ledger counts their cases the way it counts pytest's."""
from __future__ import annotations

import xml.etree.ElementTree as ET


def write(path: str, suite: str, results: list) -> None:
    """results: (name, seconds, None for a pass or "skipped: why" or the failure text)."""
    failures = sum(1 for _, _, err in results if err and not err.startswith("skipped:"))
    skipped = sum(1 for _, _, err in results if err and err.startswith("skipped:"))
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)), failures=str(failures),
                       skipped=str(skipped), time=f"{sum(t for _, t, _ in results):.3f}")
    for name, seconds, err in results:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=name, time=f"{seconds:.3f}")
        if err and err.startswith("skipped:"):
            ET.SubElement(tc, "skipped", message=err[len("skipped:"):].strip())
        elif err:
            ET.SubElement(tc, "failure", message=err.splitlines()[0][:500]).text = err
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def merge(path: str, inputs: list) -> None:
    """One junit file holding every testsuite of the inputs (missing or unreadable ones left out)."""
    import os

    root = ET.Element("testsuites")
    for p in inputs:
        if not os.path.exists(p):
            continue
        try:
            r = ET.parse(p).getroot()
        except ET.ParseError:
            continue
        suites = [r] if r.tag == "testsuite" else list(r.iter("testsuite"))
        for s in suites:
            root.append(s)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


if __name__ == "__main__":
    import sys

    merge(sys.argv[1], sys.argv[2:])

"""Results of a conformance run and their three renderings: a terminal table, JSON, and JUnit XML for CI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpack.conformance.catalog import CHECKS

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
#: Passing rows per check that are listed one by one before they are folded into a count.
MAX_ROWS_PER_CHECK = 25


@dataclass
class Finding:
    """One outcome of one check, about one subject (a layer, a blob, the manifest)."""

    check: str
    status: str
    subject: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "subject": self.subject, "message": self.message}


@dataclass
class Report:
    """Everything a run found; ``ok`` is true when no required check failed."""

    target: str
    kind: str  # "artifact" or "registry"
    findings: list[Finding] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    #: Checks that ran (a check with no failure rows then passes).
    ran: list[str] = field(default_factory=list)

    def start(self, check: str) -> None:
        if check not in CHECKS:
            raise KeyError(f"unknown check id {check}")
        if check not in self.ran:
            self.ran.append(check)

    def add(self, check: str, status: str, subject: str, message: str) -> None:
        """Record an outcome; a failure of a recommended check is downgraded to a warning."""
        self.start(check)
        if status == FAIL and not CHECKS[check].required:
            status = WARN
        self.findings.append(Finding(check, status, subject, message))

    def fail(self, check: str, subject: str, message: str, *, warn: bool = False) -> None:
        self.add(check, WARN if warn else FAIL, subject, message)

    def skip(self, check: str, message: str) -> None:
        self.add(check, SKIP, "-", message)

    def status_of(self, check: str) -> str:
        """The worst outcome of a check: fail > warn > pass > skip."""
        statuses = {f.status for f in self.findings if f.check == check}
        for status in (FAIL, WARN, PASS):
            if status in statuses:
                return status
        if check in self.ran and SKIP not in statuses:
            return PASS
        return SKIP

    @property
    def ordered(self) -> list[str]:
        """The checks that ran, in catalogue order (the order the spec lists them)."""
        return [check for check in CHECKS if check in self.ran]

    def summary(self) -> dict[str, str]:
        return {check: self.status_of(check) for check in self.ordered}

    @property
    def failed(self) -> list[str]:
        return [c for c, s in self.summary().items() if s == FAIL]

    @property
    def warned(self) -> list[str]:
        return [c for c, s in self.summary().items() if s == WARN]

    @property
    def ok(self) -> bool:
        return not self.failed

    def rows(self) -> list[Finding]:
        """One row per failure/warning/skip, plus one summary row for each check that passed."""
        out: list[Finding] = []
        for check in self.ordered:
            found = [f for f in self.findings if f.check == check]
            bad = [f for f in found if f.status in (FAIL, WARN, SKIP)]
            good = [f for f in found if f.status == PASS]
            if bad:
                out.extend(bad)
            if good and not any(f.status == FAIL for f in bad):
                if len(good) == 1:
                    out.append(good[0])
                else:
                    out.append(Finding(check, PASS, f"{len(good)} subjects", good[0].message))
            if not found:
                out.append(Finding(check, PASS, "-", CHECKS[check].title))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "ok": self.ok,
            "info": self.info,
            "checks": [
                {"id": c, "title": CHECKS[c].title, "required": CHECKS[c].required, "status": s}
                for c, s in self.summary().items()
            ],
            "findings": [f.to_json() for f in self.findings if f.status != PASS],
            "failed": self.failed,
            "warned": self.warned,
        }

    def write_junit(self, path: str | Path) -> None:
        """One testcase per check; failures carry every failing row, warnings go to system-out."""
        suite = ET.Element("testsuite", name=f"imgpack conformance {self.target}", tests=str(len(self.ran)),
                           failures=str(len(self.failed)),
                           skipped=str(sum(1 for s in self.summary().values() if s == SKIP)))
        for check, status in self.summary().items():
            case = ET.SubElement(suite, "testcase", classname=f"imgpack.conformance.{self.kind}", name=check)
            rows = [f for f in self.findings if f.check == check and f.status != PASS]
            text = "\n".join(f"{f.status}: {f.subject}: {f.message}" for f in rows)
            if status == FAIL:
                failure = ET.SubElement(case, "failure", message=f"{check} {CHECKS[check].title}")
                failure.text = text
            elif status == SKIP:
                ET.SubElement(case, "skipped", message=text or "not run")
            elif text:
                ET.SubElement(case, "system-out").text = text
        ET.indent(suite)
        Path(path).write_bytes(ET.tostring(suite, encoding="utf-8", xml_declaration=True) + b"\n")


def render_table(report: Report) -> Any:
    """A rich Table: CHECK, STATUS, SUBJECT, DETAIL."""
    from rich.table import Table
    from rich.text import Text

    colours = {PASS: "green", FAIL: "red", WARN: "yellow", SKIP: "dim"}
    table = Table(box=None, pad_edge=False, title=f"imgpack conformance: {report.target}", title_justify="left")
    for col in ("CHECK", "STATUS", "SUBJECT", "DETAIL"):
        table.add_column(col, overflow="fold")
    for row in report.rows():
        table.add_row(row.check, Text(row.status.upper(), style=colours[row.status]),
                      Text(row.subject), Text(row.message))
    return table

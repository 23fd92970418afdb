"""Running the artifact suite on a target string: what ``imgpack conformance TARGET`` does."""

from __future__ import annotations

from imgpack.conformance.artifact import ArtifactCheck, check_artifact
from imgpack.conformance.report import Report
from imgpack.conformance.sources import LayoutProblem, open_source, unreadable
from imgpack.schemas.errors import ImgpackError, UsageError


def run_target(target: str, store: str | None, *, insecure: bool = False, local: bool = False,
               ca_file: str | None = None) -> Report:
    """Open TARGET and run the artifact checks; an unreadable target is reported as LAY-001."""
    try:
        source = open_source(target, store, insecure=insecure, local=local, ca_file=ca_file)
    except UsageError:
        raise
    except (LayoutProblem, ImgpackError, OSError) as e:
        check = ArtifactCheck(unreadable(target))
        check.report.fail("LAY-001", target, str(e))
        return check._skip_rest("the target could not be read")
    try:
        return check_artifact(source)
    finally:
        source.close()

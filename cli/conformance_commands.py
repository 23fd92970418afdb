"""``imgpack conformance``: check an artifact (or, with --registry, a registry) against spec v1."""

from __future__ import annotations

import argparse

from imgpack.schemas.errors import UsageError

#: Exit status when a required check fails (the artifact or registry does not conform).
EXIT_NONCONFORMANT = 1


def cmd_conformance(args: argparse.Namespace) -> int:
    from imgpack.cli import ui
    from imgpack.conformance.report import render_table

    if args.registry:
        if args.target:
            raise UsageError("give either TARGET or --registry HOST/REPO, not both")
        from imgpack.conformance.registry_probe import probe_registry

        report = probe_registry(args.registry, insecure=args.insecure, keep=args.keep)
    elif args.target:
        from imgpack.conformance.suite import run_target

        report = run_target(args.target, getattr(args, "store", None), insecure=args.insecure, local=args.local,
                            ca_file=args.ca_file)
    else:
        raise UsageError("conformance needs a TARGET (reference, oci:PATH[:TAG], ollama:PATH[:MODEL:TAG],"
                         " HOST/REPO:TAG) or --registry HOST/REPO")
    if args.junit:
        report.write_junit(args.junit)
    if args.json:
        ui.out.print_json(data=report.to_json())
    elif report.info.get("foreign") and not getattr(args, "quiet", False):
        # Nothing of spec v1 applies: say what it is once, not as 36 skipped rows.
        from imgpack.registry.model import foreign_hint

        foreign = report.info["foreign"]
        ui.out.print(f"DOES NOT CONFORM: {ui.markup_safe(args.target)} is {ui.markup_safe(foreign)}, not an imgpack"
                     f" model; {foreign_hint(foreign)}")
    elif not getattr(args, "quiet", False):
        ui.out.print(render_table(report))
        verdict = "CONFORMS" if report.ok else "DOES NOT CONFORM"
        ui.out.print(f"{verdict}: {len(report.ran)} checks, {len(report.failed)} failed"
                     f"{' (' + ', '.join(report.failed) + ')' if report.failed else ''},"
                     f" {len(report.warned)} with warnings")
    return 0 if report.ok else EXIT_NONCONFORMANT


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "conformance",
        parents=[common],
        help="check an artifact or a registry against imgpack spec v1",
        description="Run the spec v1 conformance checks. Exit 0 only when every required check passes.",
    )
    p.add_argument("target", nargs="?", metavar="TARGET",
                   help="store reference, oci:PATH[:TAG], ollama:PATH[:MODEL:TAG], a layout directory,"
                        " or HOST/REPO:TAG")
    p.add_argument("--registry", metavar="HOST/REPO", help="probe what a registry supports instead")
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP / unverified TLS to the registry")
    p.add_argument("--ca-file", metavar="PEM", help="trust this CA bundle for the registry's TLS certificate"
                   " (also: SSL_CERT_FILE, REQUESTS_CA_BUNDLE, /etc/docker/certs.d/HOST/ca.crt)")
    p.add_argument("--local", action="store_true", help="read HOST/REPO:TAG from the local store, not the registry")
    p.add_argument("--keep", action="store_true", help="with --registry: leave the probe's uploads in place")
    p.set_defaults(func=cmd_conformance)

"""``imgpack keygen / sign``, ``verify REF --key`` and ``pull --verify-key``: cosign-compatible signatures.

Passwords come from ``IMGPACK_SIGNING_PASSWORD`` (``COSIGN_PASSWORD`` for cosign key files), else a prompt on a
terminal. A signature policy in ``$IMGPACK_CONFIG_DIR/policy.json`` (default ``~/.config/imgpack``) can require
one on every pull from a registry or repository::

    {"require": [{"scope": "ghcr.io/acme", "key": "/etc/imgpack/acme.pub"}]}

The longest matching scope wins; a pull from it is refused, before its manifest enters the store, unless a
signature verifies with that key.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgpack.cli.ui import emit_json, safe
from imgpack.schemas.errors import ImgpackError, UsageError

PASSWORD_ENV = "IMGPACK_SIGNING_PASSWORD"
COSIGN_PASSWORD_ENV = "COSIGN_PASSWORD"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ImgpackError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def _password(env: str, prompt: str, *, confirm: bool = False) -> str:
    value = os.environ.get(env)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise UsageError(f"no password: set {env} (or run on a terminal to be asked)")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != first:
        raise UsageError("the passwords differ")
    return first


def load_signing_key(path: str):  # noqa: ANN201 - a SigningKey
    from imgpack.signing.keys import inspect_private_key, load_private_key

    data = _read(path, "private key")
    info = inspect_private_key(data, path)
    password = None
    if info.encrypted:
        env = COSIGN_PASSWORD_ENV if info.cosign else PASSWORD_ENV
        if info.cosign and env not in os.environ and PASSWORD_ENV in os.environ:
            env = PASSWORD_ENV
        password = _password(env, f"Password for {path}: ")
    return load_private_key(data, password, path)


def load_verify_key(path: str):  # noqa: ANN201 - a PublicKey
    from imgpack.signing.keys import load_public_key

    return load_public_key(_read(path, "public key"), path)


def cmd_keygen(args: argparse.Namespace) -> int:
    from imgpack.signing.keys import encode_private_key, encode_public_key, generate_key

    key_path, pub_path = Path(f"{args.output}.key"), Path(f"{args.output}.pub")
    for path in (key_path, pub_path):
        if path.exists() and not args.force:
            raise ImgpackError(f"{path} exists; refusing to overwrite it (use --force)")
    password = _password(COSIGN_PASSWORD_ENV if args.cosign and COSIGN_PASSWORD_ENV in os.environ else PASSWORD_ENV,
                         "Password for the new private key: ", confirm=True)
    if not password and not args.cosign:
        raise UsageError(f"an empty password would leave the key unprotected; set {PASSWORD_ENV}")
    key = generate_key()
    from imgpack.store.atomic import write_atomic

    write_atomic(key_path, encode_private_key(key, password, "cosign" if args.cosign else "pkcs8"), 0o600)
    write_atomic(pub_path, encode_public_key(key), 0o644)
    if args.json:
        emit_json({"event": "generated", "private_key": str(key_path), "public_key": str(pub_path),
                   "fingerprint": key.public_key.fingerprint})
    elif not getattr(args, "quiet", False):
        print(f"Wrote {key_path} (private, encrypted) and {pub_path} (public, {key.public_key.fingerprint})")
    return 0


def _open(args: argparse.Namespace, write: bool):  # noqa: ANN202 - (Endpoint, Clients)
    from imgpack.registry.locations import Clients, open_location
    from imgpack.registry.retry import RetryPolicy
    from imgpack.registry.transport import TransportOptions
    from imgpack.store.store import Store

    clients = Clients(TransportOptions(insecure=args.insecure, ca_file=args.ca_file, retry=RetryPolicy()))
    store = Store.open(getattr(args, "store", None))
    endpoint = open_location(args.ref, store=store, clients=clients, write=write)
    return endpoint, clients


def _docker_reference(args: argparse.Namespace, endpoint: Any) -> str:
    from imgpack.schemas.reference import Reference
    from imgpack.signing.simplesigning import docker_reference

    name = args.as_reference or (str(endpoint.location.reference) if endpoint.location.reference else None)
    if name is None:
        raise UsageError(f"{args.ref}: give --as HOST/REPO, the repository the signature names")
    ref = Reference.parse(name)
    if ref.registry is None:
        raise UsageError(f"{name}: a signature names a registry repository; give --as HOST/REPO")
    return docker_reference(ref)


def cmd_sign(args: argparse.Namespace) -> int:
    from imgpack.registry import signatures

    key = load_signing_key(args.key)
    endpoint, clients = _open(args, write=True)
    try:
        if endpoint.reference is None:
            raise UsageError(f"{args.ref}: name the model to sign (a tag or digest)")
        result = signatures.sign(endpoint.target, endpoint.reference, key, _docker_reference(args, endpoint))
    finally:
        clients.close()
    if args.json:
        emit_json({"event": "signed", "reference": args.ref, **result.__dict__,
                   "key": key.public_key.fingerprint})
    elif not getattr(args, "quiet", False):
        legacy = f"{result.legacy}" if result.legacy else "already signed by this key"
        print(f"Signed {safe(args.ref)} ({result.digest}) with key {key.public_key.fingerprint}\n"
              f"  cosign .sig manifest: {legacy}\n  Sigstore bundle referrer: {result.bundle}")
    return 0


def verify_signature(args: argparse.Namespace) -> int:
    """``imgpack verify REF --key PUB``: exit 0 only when a signature by the key names this manifest."""
    from imgpack.registry import signatures

    key = load_verify_key(args.key)
    if args.ref is None:
        raise UsageError("verify --key: name the model whose signature to check")
    endpoint, clients = _open(args, write=False)
    try:
        if endpoint.reference is None:
            raise UsageError(f"{args.ref}: name a tag or digest")
        result = signatures.verify(endpoint.target, endpoint.reference, key)
    finally:
        clients.close()
    if args.json:
        emit_json({"event": "verified" if result.ok else "error", "reference": args.ref, "ok": result.ok,
                   "digest": result.expected_digest, "key": result.key_fingerprint,
                   "checks": [line for line in result.describe()]})
    elif not getattr(args, "quiet", False) or not result.ok:
        for line in result.describe():
            print(safe(line), file=sys.stdout if result.ok else sys.stderr)
    if not result.ok:
        raise result_error(args.ref, result)
    return 0


def result_error(ref: str, result: Any) -> ImgpackError:
    from imgpack.signing import VerificationError

    return VerificationError(f"{ref}: signature verification failed: {result.reason}")


# -- policy -------------------------------------------------------------------------------------------------


def policy_path() -> Path:
    from imgpack.registry.credentials import config_dir

    return config_dir() / "policy.json"


def policy_key(reference: str) -> str | None:
    """The key the policy requires for pulls of ``reference``, if a rule covers it."""
    path = policy_path()
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImgpackError(f"{path}: unreadable signature policy: {e}") from None
    rules = document.get("require") if isinstance(document, dict) else None
    if not isinstance(rules, list):
        raise ImgpackError(f"{path}: needs a 'require' list of {{'scope', 'key'}} rules")
    from imgpack.schemas.reference import Reference

    name = Reference.parse(reference).name
    best: tuple[int, str] | None = None
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("scope"), str) or not isinstance(rule.get("key"), str):
            raise ImgpackError(f"{path}: require[{i}] needs string 'scope' and 'key'")
        scope = rule["scope"].rstrip("/")
        if name == scope or name.startswith(scope + "/"):
            if best is None or len(scope) > best[0]:
                best = (len(scope), rule["key"])
    return best[1] if best else None


def pull_policy(key_path: str, args: argparse.Namespace) -> Callable[[Any, Any, bytes], None]:
    """A ``verify_root`` hook: refuse the pull unless the root (or, for a split model, the manifest it carries)
    has a signature by the key."""
    key = load_verify_key(key_path)

    def check(target: Any, desc: Any, raw: bytes) -> None:
        from imgpack.registry import signatures
        from imgpack.registry.model import unsplit

        result = signatures.verify(target, desc.digest, key, desc.digest)
        if not result.ok and desc.is_index:
            model, _ = unsplit(target, desc, raw)
            carried = signatures.verify(target, model.digest, key, model.digest)
            if carried.ok:
                result = carried
        if not result.ok:
            raise result_error(args.ref, result)
        if not args.json and not getattr(args, "quiet", False):
            for line in result.describe():
                print(f"imgpack: {safe(line)}", file=sys.stderr)

    return check


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("keygen", parents=[common], help="make an ECDSA P-256 key pair for signing models",
                       description="Make an ECDSA P-256 key pair: PREFIX.key (encrypted with the password from"
                                   f" ${PASSWORD_ENV} or a prompt) and PREFIX.pub.")
    p.add_argument("--output", default="imgpack", metavar="PREFIX", help="file name prefix (default: imgpack)")
    p.add_argument("--cosign", action="store_true", help="write the private key in cosign's format"
                   " (ENCRYPTED SIGSTORE PRIVATE KEY) instead of PKCS#8")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", parents=[common], help="sign a model on a registry, in the store or in a layout"
                       " (cosign's .sig and bundle forms)",
                       description="Sign the model REF names, in both of cosign's forms, so that"
                                   " 'imgpack verify --key' and 'cosign verify --key' accept it.")
    p.add_argument("ref", metavar="REF", help="HOST/REPO:TAG, a stored model or oci:PATH[:TAG]")
    p.add_argument("--key", required=True, metavar="KEY", help="private key (imgpack keygen, cosign or openssl)")
    p.add_argument("--as", dest="as_reference", metavar="HOST/REPO",
                   help="the repository the signature names (default: REF's own; needed for store-only names)")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.add_argument("--ca-file", metavar="PEM", help="trust this CA bundle for the registry's TLS certificate")
    p.set_defaults(func=cmd_sign)

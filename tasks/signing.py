"""Signatures for a run (audit or review), and their verification. Plain functions; Prefect never imported.

Two signatures, made with one key and certificate (PEM files or a PKCS#12 bundle; the passphrase comes from
the environment or a prompt, never from a config):

- each PDF report gets a **PAdES B-B** signature (B-T with an RFC 3161 timestamp when a TSA URL is given), by
  pyHanko, in a visible field drawn where the report's sign-off block has its signature box, as an
  incremental update: the report's PDF/A-3b bytes stay a prefix and the embedded evidence is untouched;
- the whole run is covered by an **in-toto Statement** (https://in-toto.io/Statement/v1) in a DSSE envelope
  (`attestation.intoto.json`): its subjects are every file of the run by sha256 (manifest.json, every table,
  the shards and parts, the signed reports; for a review also both audits' files), and its predicate is the
  verdict (run id, verdict, check counts, model, data fingerprint). A statement rather than a detached
  signature of manifest.json: whoever holds the statement can check every file and read a signed verdict
  without trusting any other file of the run, and it is the format supply-chain tooling already reads.

What a signature proves: that whoever holds the private key of the certificate vouched for these exact
bytes at the stated time (the time is the signer's own clock unless a TSA timestamped it). It does not prove
who that is unless the certificate is checked against a trust root the verifier trusts (`--trust`), and it
says nothing about whether the audit was configured well.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import XAuditError, require_extra
from .io import atomic_path, sha256_file, write_json

ATTESTATION = "attestation.intoto.json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://xaudit.dev/attestations/audit-verdict/v1"
PASSPHRASE_ENV = "XAUDIT_SIGNING_PASSPHRASE"
FIELD_ANCHOR = "signature-field"          # the id of the sign-off block's signature box in the report
FIELD_NAME = "xaudit-signature"
# the box's size in the template (templates/base.css .sigfield: 80 mm x 24 mm), in PDF points
FIELD_SIZE = (80 / 25.4 * 72, 24 / 25.4 * 72)
PDF_REPORTS = ("report.pdf", "review.pdf")


@dataclass
class Credentials:
    """A private key and its certificate (cryptography objects), plus the chain to pass along."""

    key: Any
    cert: Any
    chain: list[Any] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        from cryptography.hazmat.primitives import hashes
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()


def _read(path: str | Path | None, what: str) -> bytes:
    p = Path(path) if path else None
    if p is None or not p.is_file():
        raise XAuditError(f"{what} must be an existing file; got {str(path)!r}")
    return p.read_bytes()


def _certificates(data: bytes, what: str) -> list[Any]:
    from cryptography import x509
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise XAuditError(f"{what} must hold X.509 certificates (PEM or DER): {exc}") from None


def load_credentials(key: str | Path | None = None, cert: str | Path | None = None,
                     pkcs12: str | Path | None = None, chain: list[str | Path] | tuple = (),
                     passphrase: bytes | None = None, where: str = "sign",
                     passphrase_env: str = PASSPHRASE_ENV) -> Credentials:
    """Return the signing key and certificate from PEM/DER files (`key`, `cert`) or a PKCS#12 bundle; the
    key must belong to the certificate, and be RSA, ECDSA or Ed25519."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import pkcs12 as p12
    if bool(pkcs12) == bool(key or cert):
        raise XAuditError(f"{where}: give either 'key' and 'cert' (PEM files) or 'pkcs12', not both or neither")
    extra = [c for p in chain for c in _certificates(_read(p, f"{where}: 'chain' {p}"), f"{where}: 'chain' {p}")]
    if pkcs12:
        data = _read(pkcs12, f"{where}: 'pkcs12'")
        try:
            k, c, more = p12.load_key_and_certificates(data, passphrase)
        except ValueError as exc:
            hint = f" (set {passphrase_env})" if passphrase is None else " (check the passphrase)"
            raise XAuditError(f"{where}: 'pkcs12' {pkcs12} cannot be opened{hint}: {exc}") from None
        if k is None or c is None:
            raise XAuditError(f"{where}: 'pkcs12' {pkcs12} must hold a private key and its certificate")
        extra = [*more, *extra]
    else:
        if not key or not cert:
            raise XAuditError(f"{where}: 'key' and 'cert' are both needed; got key={key!r}, cert={cert!r}")
        data = _read(key, f"{where}: 'key'")
        try:
            k = (serialization.load_pem_private_key if b"-----BEGIN" in data else
                 serialization.load_der_private_key)(data, passphrase)
        except TypeError:
            raise XAuditError(f"{where}: 'key' {key} is encrypted: set {passphrase_env} (or type the passphrase "
                              f"at the prompt)" if passphrase is None else
                              f"{where}: 'key' {key} is not encrypted; unset {passphrase_env}") from None
        except ValueError as exc:
            raise XAuditError(f"{where}: 'key' {key} is not a private key this can read (or the passphrase is "
                              f"wrong): {str(exc)[:200]}") from None
        certs = _certificates(_read(cert, f"{where}: 'cert'"), f"{where}: 'cert' {cert}")
        c, extra = certs[0], [*certs[1:], *extra]
    if not isinstance(k, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise XAuditError(f"{where}: the key is {type(k).__name__}; use RSA, ECDSA or Ed25519")
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if k.public_key().public_bytes(*raw) != c.public_key().public_bytes(*raw):
        raise XAuditError(f"{where}: the key does not belong to the certificate {c.subject.rfc4514_string()!r}")
    return Credentials(k, c, extra)


def passphrase_from_env(name: str = PASSPHRASE_ENV) -> bytes | None:
    value = os.environ.get(name)
    return value.encode() if value else None


# --- signing ----------------------------------------------------------------------------------------------

def _sign_bytes(key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _check_bytes(public_key: Any, sig: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, data)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding (https://github.com/secure-systems-lab/dsse/blob/master/protocol.md)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _signature_box(pdf: bytes) -> tuple[int, tuple[float, float, float, float]]:
    """Return (page index, box) of the report's signature box: the named destination WeasyPrint writes for
    the element with id `signature-field` is its top-left corner."""
    from pypdf import PdfReader
    reader = PdfReader(io.BytesIO(pdf))
    dest = reader.named_destinations.get(FIELD_ANCHOR)
    if dest is None:
        raise XAuditError(f"sign: the PDF has no '{FIELD_ANCHOR}' box to sign in (rendered by an older xaudit?): "
                          f"re-render it with 'xaudit render' first")
    left, top = float(dest.left), float(dest.top)
    w, h = FIELD_SIZE
    return reader.get_destination_page_number(dest), (left, top - h, left + w, top)


def sign_pdf(path: Path, cred: Credentials, tsa_url: str | None = None, reason: str = "audit sign-off",
             location: str | None = None) -> dict[str, Any]:
    """Add a PAdES signature to the PDF at `path` (atomically replaced) and return what was signed."""
    require_extra("sign", "sign: a PAdES signature")
    from asn1crypto import keys as asn1_keys
    from asn1crypto import x509 as asn1_x509
    from cryptography.hazmat.primitives import serialization
    from pyhanko.pdf_utils import generic
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.pdf_utils.metadata.model import VENDOR
    from pyhanko.sign import fields, signers, timestamps
    from pyhanko_certvalidator.registry import SimpleCertificateStore
    from pyhanko.stamp import TextStampStyle
    original = path.read_bytes()
    page, box = _signature_box(original)
    der = serialization.Encoding.DER
    signer = signers.SimpleSigner(
        signing_cert=asn1_x509.Certificate.load(cred.cert.public_bytes(der)),
        signing_key=asn1_keys.PrivateKeyInfo.load(cred.key.private_bytes(
            der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
        cert_registry=SimpleCertificateStore.from_certs([asn1_x509.Certificate.load(c.public_bytes(der))
                                                        for c in cred.chain]))
    writer = IncrementalPdfFileWriter(io.BytesIO(original))
    if any(f.get("/T") == FIELD_NAME for f in (writer.root.get("/AcroForm") or {}).get("/Fields", [])):
        raise XAuditError(f"sign: {path.name} is already signed; verify it with 'xaudit verify'")
    # pyHanko appends itself to the Info /Producer but writes only itself into the XMP one; PDF/A wants the two
    # equal, so the Info entry is set to what the XMP will say
    try:
        info = writer.trailer.raw_get("/Info")
    except KeyError:
        info = None
    if isinstance(info, generic.IndirectObject):
        info.get_object()["/Producer"] = generic.TextStringObject(VENDOR)
        writer.mark_update(info)
    fields.append_signature_field(writer, fields.SigFieldSpec(FIELD_NAME, on_page=page, box=box))
    meta = signers.PdfSignatureMetadata(field_name=FIELD_NAME, subfilter=fields.SigSeedSubFilter.PADES,
                                        md_algorithm="sha256", reason=reason, location=location)
    stamp = TextStampStyle(stamp_text="Digitally signed by %(signer)s\n%(ts)s\nxaudit: see 'xaudit verify'")
    timestamper = timestamps.HTTPTimeStamper(tsa_url) if tsa_url else None
    out = io.BytesIO()
    try:
        signers.PdfSigner(meta, signer=signer, timestamper=timestamper, stamp_style=stamp).sign_pdf(writer, output=out)
    except Exception as exc:  # noqa: BLE001 - pyHanko's and the TSA's errors become one message
        raise XAuditError(f"sign: signing {path.name} failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    signed = out.getvalue()
    assert signed.startswith(original)       # an incremental update: the original bytes are a prefix
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(signed)
    return {"file": path.name, "profile": "PAdES B-T" if tsa_url else "PAdES B-B", "page": page + 1,
            "unsigned_sha256": hashlib.sha256(original).hexdigest(), "sha256": hashlib.sha256(signed).hexdigest()}


def run_files(run_dir: Path) -> dict[str, str]:
    """Every file of the run directory (recursively; temporary files of interrupted writes left out) by
    sha256, except the attestation itself."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_file() and rel != ATTESTATION and not p.name.endswith(".tmp"):
            out[rel] = sha256_file(p)
    return out


def sign_run(run_dir: str | Path, cred: Credentials, tsa_url: str | None = None, reason: str = "audit sign-off",
             location: str | None = None) -> dict[str, Any]:
    """Sign a finished run: its PDF reports (PAdES), then every file of it (an in-toto statement). The run
    must verify first: a signature must not vouch for files changed after the run."""
    from .outputs import seal, verify_run
    run_dir = Path(run_dir)
    if (run_dir / ATTESTATION).exists():
        raise XAuditError(f"sign: {run_dir} is already signed ({ATTESTATION}); verify it with 'xaudit verify'")
    problems = verify_run(run_dir)
    if problems:
        raise XAuditError(f"sign: {run_dir} does not match its manifest, so it must not be signed: {problems[0]}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    review = "audits" in manifest
    pdfs = [sign_pdf(run_dir / n, cred, tsa_url, reason, location) for n in PDF_REPORTS if (run_dir / n).is_file()]
    seal(run_dir, review)                     # the signed reports' hashes into the manifest
    signed_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    validation = json.loads((run_dir / "validation.json").read_text())
    model = manifest.get("model") or manifest.get("models")
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest}} for name, digest in run_files(run_dir).items()],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "kind": "review" if review else "audit", "run_id": manifest["run_id"], "verdict": manifest["verdict"],
            "counts": validation.get("counts"), "created_utc": manifest["created_utc"],
            "finished_utc": manifest.get("finished_utc"), "signed_utc": signed_utc,
            "model": model, "data": {k: manifest["data"].get(k) for k in ("source", "fingerprint", "n_rows")},
            "manifest_sha256": sha256_file(run_dir / "manifest.json"), "pdf_signatures": pdfs,
        },
    }
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    from cryptography.hazmat.primitives import serialization
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
                "signatures": [{"keyid": f"sha256:{cred.fingerprint}",
                                "sig": base64.b64encode(_sign_bytes(cred.key, pae(PAYLOAD_TYPE, payload))).decode(),
                                # the certificate travels with the envelope (DSSE allows extra fields)
                                "certificate": cred.cert.public_bytes(serialization.Encoding.PEM).decode()}]}
    write_json(run_dir / ATTESTATION, envelope)
    return {"signer": cred.subject, "certificate_sha256": cred.fingerprint, "signed_utc": signed_utc,
            "pdfs": pdfs, "files": len(statement["subject"])}


# --- verification ----------------------------------------------------------------------------------------

def load_trust(paths: list[str | Path] | tuple) -> list[Any]:
    return [c for p in paths for c in _certificates(_read(p, f"verify: '--trust' {p}"), f"verify: '--trust' {p}")]


def _trusted(cert: Any, trust: list[Any]) -> bool:
    """Whether `cert` is one of the trust roots or directly issued by one (and in its validity period)."""
    now = datetime.now(timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return False
    for root in trust:
        if cert == root:
            return True
        try:
            cert.verify_directly_issued_by(root)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not issued by this root"
            continue
    return False


def verify_signatures(run_dir: str | Path, trust: list[Any] | None = None) -> tuple[list[str], list[str]]:
    """Return (what was found, problems) for the run's signatures: the attestation (its signature, and every
    file against the digest it signed, and files added since) and each PDF report's PAdES signatures
    (validated by pyHanko; with `trust`, against those roots). An unsigned run gives one line, no problem."""
    from cryptography import x509
    run_dir = Path(run_dir)
    lines, problems = [], []
    path = run_dir / ATTESTATION
    signed_pdfs_expected = set()
    if path.is_file():
        try:
            env = json.loads(path.read_text())
            payload = base64.b64decode(env["payload"], validate=True)
            (sig,) = env["signatures"]
            cert = x509.load_pem_x509_certificate(sig["certificate"].encode())
            good = env["payloadType"] == PAYLOAD_TYPE and _check_bytes(
                cert.public_key(), base64.b64decode(sig["sig"], validate=True), pae(env["payloadType"], payload))
            statement = json.loads(payload)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            return lines, [f"{ATTESTATION}: not a signed statement this can read ({type(exc).__name__}: "
                           f"{str(exc)[:120]})"]
        from cryptography.hazmat.primitives import hashes
        who, fp = cert.subject.rfc4514_string(), cert.fingerprint(hashes.SHA256()).hex()
        pred = statement.get("predicate", {})
        if not good:
            problems.append(f"{ATTESTATION}: the signature does not match the statement (edited after signing)")
        else:
            subjects = {s["name"]: s["digest"]["sha256"] for s in statement.get("subject", [])}
            now = run_files(run_dir)
            changed = [n for n, d in subjects.items() if now.get(n) != d]
            added = [n for n in now if n not in subjects]
            problems += [f"{n}: {'missing' if n not in now else 'differs from the signed digest'} "
                         f"(changed after signing)" for n in changed]
            problems += [f"{n}: not covered by the signature (added after signing)" for n in added]
            trusted = "" if trust is None else (" — certificate trusted" if _trusted(cert, trust) else
                                                " — certificate NOT issued by a given trust root")
            if trust is not None and not _trusted(cert, trust):
                problems.append(f"{ATTESTATION}: signed by {who}, whose certificate is not trusted by --trust")
            state = "covers every file as it is now" if not changed and not added else \
                f"does not cover the run as it is now ({len(changed)} changed, {len(added)} added)"
            lines.append(f"{ATTESTATION}: run {pred.get('run_id')} verdict {pred.get('verdict')} signed by {who} "
                         f"(certificate sha256 {fp}) at {pred.get('signed_utc')} (signer's clock); {len(subjects)} "
                         f"files; {state}{trusted}" + ("" if trust is not None else
                                                       "; signer not checked against a trust root (pass --trust)"))
            signed_pdfs_expected = {p["file"] for p in pred.get("pdf_signatures", [])}
    for name in PDF_REPORTS:
        if (run_dir / name).is_file():
            found = _verify_pdf(run_dir / name, trust, lines, problems)
            if name in signed_pdfs_expected and not found:
                problems.append(f"{name}: the statement says it was signed, but it carries no signature")
    if not path.is_file() and not any("signed by" in ln for ln in lines):
        lines.append("not signed (sign with 'xaudit sign RUN_DIR --key KEY.pem --cert CERT.pem')")
    return lines, problems


def _signature_count(pdf: Path) -> int:
    """Return how many signed signature fields `pdf` has, read with pypdf (a core dependency); a PDF pypdf
    cannot read counts as one, so pyHanko (which reports why) gets to look at it."""
    from pypdf import PdfReader
    try:
        fields = PdfReader(pdf, strict=False).get_fields() or {}
    except Exception:  # noqa: BLE001 - damaged: let the full check say so
        return 1
    return sum(1 for f in fields.values() if f.get("/FT") == "/Sig" and f.get("/V") is not None)


def _verify_pdf(pdf: Path, trust: list[Any] | None, lines: list[str], problems: list[str]) -> int:
    """Validate every signature in `pdf` with pyHanko; returns how many there are. Without pyHanko (the `sign`
    extra) a PDF without signatures needs nothing more; one with signatures is refused naming the extra."""
    if _signature_count(pdf) == 0:
        return 0
    require_extra("sign", f"verify: {pdf.name} carries PAdES signatures; checking them")
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext
    from cryptography.hazmat.primitives import serialization
    try:
        with open(pdf, "rb") as f:
            reader = PdfFileReader(f, strict=False)
            sigs = list(reader.embedded_signatures)
            for s in sigs:
                own = s.signer_cert
                roots = ([asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in trust]
                         if trust is not None else [own])
                status = validate_pdf_signature(s, ValidationContext(trust_roots=roots, allow_fetching=False))
                who = own.subject.human_friendly.replace("\n", ", ")
                when = status.timestamp_validity.timestamp if status.timestamp_validity else status.signer_reported_dt
                whole = status.coverage.name == "ENTIRE_FILE"
                if not (status.intact and status.valid):
                    problems.append(f"{pdf.name}: signature by {who} does not match the file (altered after signing)")
                elif not whole:
                    problems.append(f"{pdf.name}: signature by {who} covers an earlier revision, not the file as it "
                                    f"is now (bytes were added after signing)")
                if trust is not None and not status.trusted:
                    problems.append(f"{pdf.name}: signed by {who}, whose certificate is not trusted by --trust")
                lines.append(f"{pdf.name}: PAdES signature by {who} (certificate sha256 {own.sha256.hex()}) at "
                             f"{when} ({'timestamped by a TSA' if status.timestamp_validity else 'signer clock'}); "
                             f"{'intact' if status.intact and status.valid else 'BROKEN'}, "
                             f"{'covers the whole file as it is now' if whole else 'does NOT cover the whole file'}"
                             + ("" if trust is None else "; trusted" if status.trusted else "; NOT trusted"))
    except Exception as exc:  # noqa: BLE001 - a damaged PDF is a finding, not a crash
        problems.append(f"{pdf.name}: its signatures cannot be read ({type(exc).__name__}: {str(exc)[:120]})")
        return 0
    return len(sigs)

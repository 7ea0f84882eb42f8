"""Signed runs: PAdES signatures of the PDF report (validated by pyHanko with the test CA as trust root) and an
in-toto statement over every file; `xaudit verify` names what changed after signing. The tests make their own
certificates (a CA and a signer it issued, and an unrelated self-signed one)."""
from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("pyhanko")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402
from cryptography.hazmat.primitives.serialization import pkcs12  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from xaudit.flows.cli import main as cli  # noqa: E402
from synthetic_run import build  # noqa: E402
from xaudit.tasks.errors import XAuditError  # noqa: E402
from xaudit.tasks.io import write_json  # noqa: E402
from xaudit.tasks.outputs import REPORTS, artifact_hashes, file_hashes, seal, verify_run  # noqa: E402
from xaudit.tasks.report import render_report  # noqa: E402
from xaudit.tasks.signing import ATTESTATION, load_credentials, sign_run, verify_signatures  # noqa: E402


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xaudit tests")])


def _cert(subject_key, cn, issuer_key=None, issuer_cert=None, ca=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn))
         .issuer_name(issuer_cert.subject if issuer_cert else _name(cn)).public_key(subject_key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True))
    signer = issuer_key or subject_key
    return b.sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def _pem(path, obj, passphrase=None):
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        enc = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_key, "xaudit test CA", ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(key, "Test Auditor", ca_key, ca)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = _cert(other_key, "Someone Else")
    return dict(ca=_pem(d / "ca.pem", ca), ca_key=_pem(d / "ca_key.pem", ca_key), key=_pem(d / "key.pem", key), cert=_pem(d / "cert.pem", cert),
                enc_key=_pem(d / "enc_key.pem", key, b"s3cret"), other=_pem(d / "other.pem", other),
                other_key=_pem(d / "other_key.pem", other_key), p12=_p12(d / "signer.p12", key, cert, ca, b"s3cret"),
                fingerprint=cert.fingerprint(hashes.SHA256()).hex())


def _p12(path, key, cert, ca, passphrase):
    path.write_bytes(pkcs12.serialize_key_and_certificates(b"signer", key, cert, [ca],
                                                           serialization.BestAvailableEncryption(passphrase)))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished, verifiable run: the synthetic run's tables with real hashes, its reports and sealed manifest."""
    run = build(tmp_path_factory.mktemp("signed") / "run", hostile=False)
    manifest = json.loads((run / "manifest.json").read_text())
    from xaudit.tasks.io import sha256_json
    manifest.update(artifacts={k: v for k, v in artifact_hashes(run).items() if k not in REPORTS},
                    files=file_hashes(run), config_sha256=sha256_json(manifest["config"]))
    write_json(run / "manifest.json", manifest)
    render_report(run)
    seal(run)
    assert verify_run(run) == []
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _trusted(pki):
    from xaudit.tasks.signing import load_trust
    return load_trust([pki["ca"]])


def test_sign_then_verify_covers_every_file_and_the_pdf_keeps_its_archive_form(run, pki, capsys):
    unsigned = (run / "report.pdf").read_bytes()
    assert cli(["sign", str(run), "--key", str(pki["key"]), "--cert", str(pki["cert"]), "--chain", str(pki["ca"])]) == 0
    out = capsys.readouterr().out
    assert "PAdES B-B signature in the sign-off block" in out and pki["fingerprint"] in out
    signed = (run / "report.pdf").read_bytes()
    assert signed.startswith(unsigned) and len(signed) > len(unsigned)      # an incremental update

    # pyHanko's own validator accepts it with the test CA as the trust root, over the whole file
    from asn1crypto import x509 as ax
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext
    with open(run / "report.pdf", "rb") as f:
        (sig,) = PdfFileReader(f).embedded_signatures
        status = validate_pdf_signature(sig, ValidationContext(
            trust_roots=[ax.Certificate.load(x509.load_pem_x509_certificate(pki["ca"].read_bytes())
                                             .public_bytes(serialization.Encoding.DER))]))
        assert status.bottom_line and status.coverage.name == "ENTIRE_FILE"
        assert "Test Auditor" in status.signing_cert.subject.human_friendly

    # still PDF/A-3b, Info and XMP Producer agree, and the attachments are the run's files byte for byte
    from pypdf import PdfReader
    reader = PdfReader(run / "report.pdf")
    xmp = reader.xmp_metadata
    xml = reader.trailer["/Root"]["/Metadata"].get_object().get_data().decode()
    assert re.search(r"pdfaid:part(>|=\")3", xml) and re.search(r"pdfaid:conformance(>|=\")B", xml), xml[:2000]
    assert reader.metadata["/Producer"] == xmp.pdf_producer
    if shutil.which("pdfdetach"):
        out_dir = run.parent / "detached"
        out_dir.mkdir()
        subprocess.run(["pdfdetach", "-saveall", "-o", str(out_dir), str(run / "report.pdf")], check=True)
        for name in ("metrics.parquet", "validation.json"):
            assert (out_dir / name).read_bytes() == (run / name).read_bytes(), name
    for name, data in reader.attachments.items():
        if name != "manifest.json":
            assert data[0] == (run / name).read_bytes(), name

    lines, problems = verify_signatures(run, _trusted(pki))
    assert problems == [], problems
    assert any(ATTESTATION in ln and "covers every file as it is now" in ln and "trusted" in ln for ln in lines)
    assert any("report.pdf: PAdES signature by" in ln and "covers the whole file" in ln for ln in lines)
    assert verify_run(run) == []
    assert cli(["verify", str(run), "--trust", str(pki["ca"])]) == 0
    assert "every signature holds" in capsys.readouterr().out
    statement = json.loads(__import__("base64").b64decode(json.loads((run / ATTESTATION).read_text())["payload"]))
    names = {s["name"] for s in statement["subject"]}
    assert {"manifest.json", "metrics.parquet", "report.pdf", "report.html"} <= names
    assert statement["predicate"]["verdict"] == json.loads((run / "validation.json").read_text())["verdict"]


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["metrics.parquet", "manifest.json", "report.html", "report.pdf",
                                    "validation.json", ATTESTATION, "inputs/NEW"])
def test_one_changed_byte_anywhere_in_a_signed_run_fails_verify_naming_the_file(run, pki, victim, capsys):
    cred = load_credentials(pki["key"], pki["cert"])
    sign_run(run, cred)
    if victim == "inputs/NEW":
        (run / "inputs").mkdir(exist_ok=True)
        (run / "inputs" / "NEW").write_bytes(b"added later")
    elif victim == ATTESTATION:
        env = json.loads((run / ATTESTATION).read_text())
        payload = json.loads(__import__("base64").b64decode(env["payload"]))
        payload["predicate"]["verdict"] = "PASS" if payload["predicate"]["verdict"] != "PASS" else "FAIL"
        env["payload"] = __import__("base64").b64encode(json.dumps(payload).encode()).decode()
        write_json(run / ATTESTATION, env)
    elif victim == "report.pdf":
        _flip(run / victim, 0.3)         # inside the signed original revision
    else:
        _flip(run / victim)
    assert cli(["verify", str(run), "--trust", str(pki["ca"])]) == 1
    out = capsys.readouterr().out
    shown = "inputs/NEW" if victim == "inputs/NEW" else victim
    assert any(line.startswith(shown) for line in out.splitlines() if "problem" not in line), out


def test_bytes_appended_after_signing_are_not_covered(run, pki):
    sign_run(run, load_credentials(pki["key"], pki["cert"]))
    with open(run / "report.pdf", "ab") as f:
        f.write(b"\n% appended after signing\n")
    _, problems = verify_signatures(run, _trusted(pki))
    assert any(p.startswith("report.pdf:") for p in problems), problems


def test_an_untrusted_signer_fails_with_trust_and_is_reported_without(run, pki):
    sign_run(run, load_credentials(pki["other_key"], pki["other"]))        # RSA, self-signed, not from the CA
    lines, problems = verify_signatures(run, _trusted(pki))
    assert any("not trusted" in p for p in problems)
    lines, problems = verify_signatures(run, None)
    assert problems == [] and any("not checked against a trust root" in ln for ln in lines)


def test_keys_come_from_pkcs12_or_encrypted_pem_with_the_passphrase_from_the_environment(run, pki, monkeypatch):
    with pytest.raises(XAuditError, match="is encrypted: set XAUDIT_SIGNING_PASSPHRASE"):
        load_credentials(pki["enc_key"], pki["cert"])
    with pytest.raises(XAuditError, match="pkcs12.*cannot be opened"):
        load_credentials(pkcs12=pki["p12"])
    with pytest.raises(XAuditError, match="does not belong to the certificate"):
        load_credentials(pki["key"], pki["other"])
    with pytest.raises(XAuditError, match="either 'key' and 'cert'.*or 'pkcs12'"):
        load_credentials(pki["key"], pki["cert"], pkcs12=pki["p12"])
    monkeypatch.setenv("XAUDIT_SIGNING_PASSPHRASE", "s3cret")
    assert cli(["sign", str(run), "--pkcs12", str(pki["p12"])]) == 0
    assert verify_signatures(run, _trusted(pki))[1] == []
    assert load_credentials(pki["enc_key"], pki["cert"], passphrase=b"s3cret").fingerprint == pki["fingerprint"]


def test_a_tampered_run_is_not_signed_and_a_signed_run_is_not_rerendered_or_resigned(run, pki, capsys):
    cred = load_credentials(pki["key"], pki["cert"])
    original = (run / "metrics.parquet").read_bytes()
    _flip(run / "metrics.parquet")
    with pytest.raises(XAuditError, match="does not match its manifest, so it must not be signed"):
        sign_run(run, cred)
    assert not (run / ATTESTATION).exists()
    (run / "metrics.parquet").write_bytes(original)
    sign_run(run, cred)
    with pytest.raises(XAuditError, match="already signed"):
        sign_run(run, cred)
    assert cli(["render", str(run)]) == 2
    assert "is signed; re-rendering would void its signatures" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tsa(pki, tmp_path_factory):
    """A timestamp authority process on 127.0.0.1 with a timestamping certificate from the test CA."""
    import os
    import signal
    import sys
    import time
    from cryptography.x509.oid import ExtendedKeyUsageOID
    d = tmp_path_factory.mktemp("tsa")
    ca_key = serialization.load_pem_private_key(pki["ca_key"].read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki["ca"].read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)   # pyHanko's test TSA signs with RSA
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("xaudit test TSA")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path, port_file = _pem(d / "tsa.pem", cert), _pem(d / "tsa_key.pem", key), d / "port"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "tsa_server.py"), str(cert_path),
                             str(key_path), str(port_file)])
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the TSA did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port_file.read_text()}/"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_tsa_url_gives_a_timestamped_pades_b_t_signature(run, pki, tsa, capsys):
    assert cli(["sign", str(run), "--key", str(pki["key"]), "--cert", str(pki["cert"]), "--tsa", tsa]) == 0
    assert "PAdES B-T signature" in capsys.readouterr().out
    lines, problems = verify_signatures(run, _trusted(pki))
    assert problems == [], problems
    assert any("report.pdf: PAdES signature" in ln and "timestamped by a TSA" in ln for ln in lines), lines

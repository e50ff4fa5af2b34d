"""egressd's inspection CA: made for trials by :func:`init`, checked by :func:`load`, handed to mitmproxy by
:func:`certstore` in memory.

The CA signs a leaf certificate for each name an inspected tunnel serves (mitmproxy's ``dummy_cert``: the leaf
carries the CA's own public key and is signed with SHA-256, so the key is EC or RSA, never Ed25519). The key is
read once from ``--inspect-ca-key`` and never written anywhere else: :func:`certstore` builds mitmproxy's
``CertStore`` from the loaded objects, with no ``confdir``, no DH parameter file (ECDHE only) and no copy on disk.
A key file that other users may read is refused, the way ssh refuses one (mount the Secret with ``defaultMode:
0400``). Only :func:`certstore` imports mitmproxy; :func:`init` and :func:`load` run on any Python egressd runs on.
"""

from __future__ import annotations

import datetime as _dt
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from mitmproxy.certs import CertStore

CERT_FILE = "ca.crt"
KEY_FILE = "ca.key"
TRIAL_DAYS = 365
MIN_RSA_BITS = 2048

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CaError(ValueError):
    """The CA files cannot be used: the message says which file, what is wrong and what to do."""


def init(
    directory: Path | str, *, common_name: str = "egressd inspection CA", days: int = TRIAL_DAYS
) -> tuple[Path, Path]:
    """Make a CA for trials in ``directory`` (created 0700 if missing): an EC P-256 key in ``ca.key`` (mode
    0600, created exclusively: an existing file is never overwritten) and its self-signed certificate in
    ``ca.crt``, valid ``days`` days, allowed to sign server certificates only (path length 0). Return the paths
    (certificate, key)."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    for path in (cert_path, key_path):
        if path.exists():
            raise CaError(f"{path} exists already; egressd never overwrites a CA (remove it first, or pick another "
                          "directory)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egressd"),
    ])
    now = _dt.datetime.now(_dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def load(cert_path: Path | str, key_path: Path | str) -> tuple[x509.Certificate, CaKey]:
    """Read and check the CA: a certificate that is a CA and valid now, and its key (EC, or RSA of 2048 bits or
    more, unencrypted PEM), readable by no other user. Raise :class:`CaError` saying what is wrong."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    try:
        cert_pem = cert_path.read_bytes()
        mode = os.stat(key_path).st_mode
        key_pem = key_path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read the inspection CA: {exc.filename}: {exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise CaError(f"{key_path}: other users may read the CA key (mode {stat.S_IMODE(mode):04o}); allow only "
                      "egressd's user (chmod 0400, or defaultMode: 0400 on the Secret volume)")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CaError(f"{cert_path}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"{key_path}: a {type(key).__name__.removeprefix('_')} key cannot sign mitmproxy's leaf "
                      "certificates; use EC P-256 or RSA-2048 (egressd inspect-ca init makes EC P-256)")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise CaError(f"{key_path}: an RSA key of {key.key_size} bits is too weak; use 2048 bits or more")
    if cert.public_key() != key.public_key():
        raise CaError(f"{key_path} is not the key of {cert_path} (their public keys differ)")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaError(f"{cert_path} is not a CA certificate (no basicConstraints CA:TRUE); clients would refuse "
                      "the leaves it signs")
    now = _dt.datetime.now(_dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CaError(f"{cert_path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                      f"{cert.not_valid_after_utc:%Y-%m-%d}); make or mount a current one")
    return cert, key


def certstore(cert: x509.Certificate, key: CaKey) -> CertStore:
    """mitmproxy's certificate store over our CA, built in memory (no file is read or written)."""
    from mitmproxy import certs

    ca = certs.Cert(cert)
    return certs.CertStore(key, ca, None, certs.dummy_crl(key, cert), None)  # type: ignore[arg-type]

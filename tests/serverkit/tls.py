"""A throwaway certificate authority for the TLS tests of every front-end:
certificates made with the ``openssl`` CLI, in a temp dir that dies with the run."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.serverkit import require_binary


# -- the CA ---------------------------------------------------------

@dataclass(frozen=True)
class ServerCert:
    """A server certificate and its unencrypted key (PEM), signed by ``ca_file``."""

    cert_file: Path
    key_file: Path
    ca_file: Path          # the CA certificate a client must trust to accept it
    dh_file: Path          # RFC 7919 ffdhe2048 parameters (ngircd would otherwise generate its own)


@dataclass(frozen=True)
class ThrowawayCA:
    """A CA made for one test run: its key lives in ``dir`` and dies with it.
    Made with the ``openssl`` CLI (EC P-256 keys: ~10 ms per certificate)."""

    dir: Path
    ca_file: Path
    ca_key: Path
    dh_file: Path
    openssl: str

    @classmethod
    def create(cls, directory: Path) -> "ThrowawayCA":
        openssl = require_binary("openssl")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ca_file, ca_key, dh_file = directory / "ca.pem", directory / "ca.key", directory / "dh.pem"
        _openssl(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", ca_key, "-out", ca_file, "-days", "2",
                 "-subj", "/O=releasebot tests/CN=releasebot throwaway test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        _openssl(openssl, "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048",
                 "-out", dh_file)
        return cls(directory, ca_file, ca_key, dh_file, openssl)

    def issue(self, into: Path, dns: tuple[str, ...] = ("localhost",),
              ips: tuple[str, ...] = ("127.0.0.1",)) -> ServerCert:
        """A server certificate for ``dns`` names and ``ips`` (subjectAltName;
        the first name is also the CN), valid for two days, with its key
        (mode 0600, owned by whoever runs the tests), in directory ``into``."""
        into = Path(into)
        into.mkdir(parents=True, exist_ok=True)
        key, csr, cert, ext = (into / "server.key", into / "server.csr", into / "server.pem", into / "server.ext")
        sans = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
        ext.write_text("basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\n"
                       f"subjectAltName={sans}\n"
                       "subjectKeyIdentifier=hash\n"
                       "authorityKeyIdentifier=keyid,issuer\n")
        _openssl(self.openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={(dns or ips)[0]}")
        _openssl(self.openssl, "x509", "-req", "-in", csr, "-CA", self.ca_file, "-CAkey", self.ca_key,
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
                 "-extfile", ext, "-out", cert)
        return ServerCert(cert, key, self.ca_file, self.dh_file)


def _openssl(openssl: str, *args: object) -> None:
    result = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({result.returncode}): {result.stderr.strip()}")

"""A throwaway PKI made with the openssl command: a CA (ca.crt), a server's tls.crt/tls.key (no extended key usage,
so it may act as a client too, as the chart's probes use it) and a client's client.crt/client.key: the files of a
kubernetes.io/tls Secret and more."""

from __future__ import annotations

import subprocess
from pathlib import Path

CA_CONFIG = """[req]
distinguished_name = dn
x509_extensions = ca
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(root: Path, server_ip: str = "127.0.0.1") -> Path:
    """Writes the files into `root` (the server's certificate names `server_ip` and localhost); returns `root`."""
    (root / "ca.cnf").write_text(CA_CONFIG)
    for key in ("ca", "tls", "client"):
        _openssl(root, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{key}.key")
    _openssl(root, "req", "-x509", "-config", "ca.cnf", "-key", "ca.key", "-subj", "/CN=pdserve test CA", "-days",
             "2", "-out", "ca.crt")
    leaves = {"tls": f"subjectAltName = IP:{server_ip}, DNS:localhost", "client": "extendedKeyUsage = clientAuth"}
    for serial, (name, extension) in enumerate(leaves.items(), start=2):
        (root / f"{name}.ext").write_text(f"basicConstraints = CA:FALSE\nauthorityKeyIdentifier = keyid\n{extension}\n")
        _openssl(root, "req", "-new", "-config", "ca.cnf", "-key", f"{name}.key", "-subj", f"/CN=pdserve {name}",
                 "-out", f"{name}.csr")
        _openssl(root, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial",
                 str(serial), "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return root

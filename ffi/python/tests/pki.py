"""A throw-away certificate authority and one node certificate for 127.0.0.1, for the mutual
TLS tests (openssl must be on PATH)."""

import subprocess
from pathlib import Path


def make_test_ca(d: Path):
    """Creates `d` and in it a CA and a node certificate signed by it; returns (cert, key, ca)."""
    d.mkdir()

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ca")
    ossl("req", *ec, "-keyout", "n.key", "-out", "n.csr", "-subj", "/CN=n")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    ossl("x509", "-req", "-in", "n.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "n.pem", "-days", "2", "-extfile", "ext.cnf")
    return (d / "n.pem", d / "n.key", d / "ca.pem")

"""The CA's command line, as an operator uses it: bootstrap, local-token, serve, issue."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe.svid.x509_svid import X509Svid

from ca import keys
from ca.errors import KeyMaterialError
from sidemesh.cli import main
from sidemesh.spiffe import SpiffeId
from tests.support import pki

SIDEMESH = [sys.executable, "-m", "sidemesh"]


def serve_local(tmp_path: Path) -> list[str]:
    """`ca serve` on the CA directory and local token file under ``tmp_path``."""
    return [
        "ca", "serve", "--authenticator", "local",
        "--token-file", str(tmp_path / "tokens.yaml"), "--ca-dir", str(tmp_path / "ca"),
    ]  # fmt: skip


def test_help_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--help"],
        ["ca", "--help"],
        ["ca", "serve", "--help"],
        ["ca", "issue", "--help"],
        ["ca", "bootstrap", "--help"],
        ["ca", "bundle", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "bootstrap",
        "serve",
        "issue",
        "local-token",
        "--token-file",
        "--out-dir",
        "--rate-limit",
        "SIDEMESH_CA_LISTEN",
        "--refresh-hint",
    ):
        assert word in out


def test_bootstrap_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca-key.pem").st_mode) == 0o600
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca"), "--force"]) == 0
    # Over files that exist with a looser mode too (os.open's mode applies only to a new file: a
    # root key written over a 0644 file stayed readable by everyone)
    for name in ("root-key.pem", "ca-key.pem"):
        os.chmod(tmp_path / "ca" / name, 0o644)
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca"), "--force"]) == 0
    for name in ("root-key.pem", "ca-key.pem"):
        assert stat.S_IMODE(os.stat(tmp_path / "ca" / name).st_mode) == 0o600, name
    token_file = tmp_path / "tokens.yaml"
    token_file.write_text("tokens: []\n")
    token_file.chmod(0o644)
    assert main(["ca", "local-token", "--file", str(token_file), "--identity", "shop/a"]) == 0
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600


def test_serve_with_missing_material_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "t.yaml"
    tokens.write_text("tokens: []\n")
    code = main(
        [
            "ca",
            "serve",
            "--ca-dir",
            str(tmp_path / "nothing"),
            "--authenticator",
            "local",
            "--token-file",
            str(tokens),
        ]
    )
    assert code == 2
    assert "sidemesh ca bootstrap" in capsys.readouterr().err


def test_serve_and_issue_as_processes(tmp_path: Path) -> None:
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    token = subprocess.run(
        [*SIDEMESH, "ca", "local-token", "--file", str(tmp_path / "tokens.yaml"), "--identity", "shop/cart"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert len(token) >= 40
    (tmp_path / "token").write_text(token)
    proc = subprocess.Popen(
        [*SIDEMESH, *serve_local(tmp_path), "--listen", "127.0.0.1:0", "--metrics-listen", ""],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            record = json.loads(line)
            if record["event"] == "CA serving":
                port = record["port"]
            if record["event"] == "gRPC helper threads under SCHED_BATCH":
                assert record["threads"] >= 1
                break
        assert port
        if sys.platform == "linux":
            # gRPC's helper threads run under SCHED_BATCH, the thread that signs does not.
            policies = {int(t): os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{proc.pid}/task")}
            assert policies.pop(proc.pid) == os.SCHED_OTHER
            assert os.SCHED_BATCH in policies.values(), policies
        out = subprocess.run(
            [
                *SIDEMESH,
                "ca",
                "issue",
                "--ca",
                f"127.0.0.1:{port}",
                "--bundle",
                str(tmp_path / "ca" / "root-cert.pem"),
                "--token-file",
                str(tmp_path / "token"),
                "--identity",
                "shop/cart",
                "--ttl",
                "10m",
                "--out-dir",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "spiffe://cluster.local/ns/shop/sa/cart" in out.stdout
        svid = X509Svid.load(tmp_path / "out" / "cert-chain.pem", tmp_path / "out" / "key.pem", Encoding.PEM)
        assert str(svid.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/cart"
        assert stat.S_IMODE(os.stat(tmp_path / "out" / "key.pem").st_mode) == 0o600
        # The wrong identity for the token: refused, with a hint.
        out = subprocess.run(
            [
                *SIDEMESH,
                "ca",
                "issue",
                "--ca",
                f"127.0.0.1:{port}",
                "--bundle",
                str(tmp_path / "ca" / "root-cert.pem"),
                "--token-file",
                str(tmp_path / "token"),
                "--identity",
                "shop/frontend",
                "--out-dir",
                str(tmp_path / "out2"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2
        assert "PERMISSION_DENIED" in out.stderr and "--identity must be" in out.stderr
        assert not (tmp_path / "out2").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
    # SIGTERM ends it cleanly.
    assert proc.returncode == 0


def _issue_nowhere(tmp_path: Path) -> list[str]:
    """`ca issue` with the bundle of the CA in tmp_path/ca, against an address where no CA is."""
    bundle = str(tmp_path / "ca" / "root-cert.pem")
    return ["ca", "issue", "--ca", "127.0.0.1:1", "--bundle", bundle, "--token", "x", "--identity", "shop/cart",
            "--out-dir", str(tmp_path / "out")]  # fmt: skip


def test_issue_against_nothing_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")])
    assert main(_issue_nowhere(tmp_path)) == 2
    err = capsys.readouterr().err
    # (nothing refused anything: it said "the CA refused" of a CA it never reached)
    assert "could not reach the CA at 127.0.0.1:1" in err and "is the CA running" in err, err


def test_bundle_as_pem_and_as_a_spiffe_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """X509-SVID section 6.1: one JWK per root, use x509-svid, x5c holding exactly that DER
    certificate, no kid; the JWK's key is the certificate's (RFC 7518: base64url, no padding)."""
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    other = keys.bootstrap(tmp_path / "other", "cluster.local", dt.datetime.now(dt.UTC))
    both = tmp_path / "both.pem"
    both.write_bytes((tmp_path / "ca" / keys.ROOTS).read_bytes() + keys.cert_pem(*other.roots))
    capsys.readouterr()

    assert main(["ca", "bundle", "--ca-dir", str(tmp_path / "ca")]) == 0
    assert capsys.readouterr().out.encode() == (tmp_path / "ca" / keys.ROOTS).read_bytes()

    assert (
        main(["ca", "bundle", "--bundle-file", str(both), "--format", "spiffe", "--refresh-hint", "5m"]) == 0
    )
    doc = json.loads(capsys.readouterr().out)
    # Another trust domain's root is left out (a consumer trusts every root of a trust domain's
    # bundle for it: other.org's CA would mint example.org's IDs), with a warning
    foreign = keys.bootstrap(tmp_path / "foreign", "other.org", dt.datetime.now(dt.UTC))
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(both.read_bytes() + keys.cert_pem(*foreign.roots))
    assert main(["ca", "bundle", "--bundle-file", str(mixed), "--format", "spiffe"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["keys"]) == 2 and "left out" in err and "other.org" in err
    assert main(["ca", "bundle", "--bundle-file", str(mixed), "--trust-domain", "other.org"]) == 0
    out, _ = capsys.readouterr()
    assert x509.load_pem_x509_certificates(out.encode()) == list(foreign.roots)
    # --ca-dir: the trust domain its signing certificate names (the command as documented works
    # for a CA of any trust domain)
    assert main(["ca", "bundle", "--ca-dir", str(tmp_path / "foreign")]) == 0
    out, err = capsys.readouterr()
    assert x509.load_pem_x509_certificates(out.encode()) == list(foreign.roots) and not err
    assert doc["spiffe_refresh_hint"] == 300 and "spiffe_sequence" not in doc
    roots = x509.load_pem_x509_certificates(both.read_bytes())
    assert len(doc["keys"]) == len(roots) == 2
    for jwk, root in zip(doc["keys"], roots, strict=True):
        assert jwk["use"] == "x509-svid" and "kid" not in jwk
        assert len(jwk["x5c"]) == 1
        assert x509.load_der_x509_certificate(base64.b64decode(jwk["x5c"][0])) == root
        assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
        point = root.public_key().public_numbers()  # type: ignore[union-attr]
        for name, value in (("x", point.x), ("y", point.y)):
            assert "=" not in jwk[name]
            assert int.from_bytes(base64.urlsafe_b64decode(jwk[name] + "=="), "big") == value

    assert main(["ca", "bundle", "--ca-dir", str(tmp_path / "nothing")]) == 2
    assert "sidemesh ca bootstrap" in capsys.readouterr().err
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert main(["ca", "bundle", "--bundle-file", str(tmp_path / "junk.pem")]) == 2
    assert "junk.pem" in capsys.readouterr().err
    # A workload's certificate is no trust anchor (X509-SVID 6.1): published as x509-svid, a
    # consumer whose verifier checks the CA flag on intermediates only took that workload's key
    # as an authority for the whole trust domain.
    authority = keys.load(tmp_path / "ca")
    leaf = pki.make_svid(authority, SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")).leaf
    with_leaf = tmp_path / "with-leaf.pem"
    with_leaf.write_bytes((tmp_path / "ca" / keys.ROOTS).read_bytes() + leaf.pem)
    for fmt in ("spiffe", "pem"):
        assert main(["ca", "bundle", "--bundle-file", str(with_leaf), "--format", fmt]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "certificate 2 (no subject) is not a CA certificate" in err, err
    (tmp_path / "ca" / keys.ROOTS).write_bytes(with_leaf.read_bytes())  # root-cert.pem itself
    with pytest.raises(KeyMaterialError, match="not a CA"):
        keys.load(tmp_path / "ca")


@pytest.mark.parametrize("held", ["--listen", "--metrics-listen"])
def test_serve_on_an_address_in_use_names_the_option(
    held: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    (tmp_path / "tokens.yaml").write_text("tokens: []\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        listen = {"--listen": "127.0.0.1:0", "--metrics-listen": "127.0.0.1:0", held: address}
        code = main(
            [*serve_local(tmp_path), *[x for option, value in listen.items() for x in (option, value)]]
        )
    assert code == 2
    err = capsys.readouterr().err
    assert f"cannot listen on {held} {address}: " in err and "pick another address" in err
    assert "Traceback" not in err


def test_issue_with_the_token_file_instead_of_a_token_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")])
    tokens = tmp_path / "tokens.yaml"
    assert main(["ca", "local-token", "--file", str(tokens), "--identity", "shop/cart"]) == 0
    capsys.readouterr()
    common = ["ca", "issue", "--ca", "127.0.0.1:1", "--bundle", str(tmp_path / "ca" / "root-cert.pem")]
    code = main([*common, "--token-file", str(tokens), "--identity", "shop/cart", "--out-dir", str(tmp_path)])
    assert code == 2
    assert "not the token file that `sidemesh ca serve --token-file` reads" in capsys.readouterr().err
    (tmp_path / "token").write_text("x\n")
    code = main(
        [*common, "--token-file", str(tmp_path / "token"), "--identity", "shop/cart", "--out-dir", "/proc/x"]
    )
    assert code == 2
    assert "cannot write --out-dir /proc/x" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--root-lifetime", "10"],
            "argument --root-lifetime: '10' is shorter than 1d (a bare number is seconds)",
        ),
        (
            ["--intermediate-lifetime", "1y"],
            "'1y' is not a duration (examples: 30s, 5m, 1h30m, 250ms); units:",
        ),
        (
            ["--trust-domain", "bad domain"],
            "argument --trust-domain: trust domain 'bad domain' may contain only",
        ),
        (["--trust-domain", "spiffe://x.org"], "(the name alone, without spiffe://)"),
    ],
)
def test_bootstrap_refuses_what_would_make_a_useless_ca(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A root or intermediate that expires within seconds (a bare number is seconds), or a trust
    domain no SPIFFE implementation parses, was written without a word."""
    with pytest.raises(SystemExit) as info:
        main(["ca", "bootstrap", "--dir", str(tmp_path / "ca"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()


def test_serve_with_a_broken_token_file_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    (tmp_path / "tokens.yaml").write_text("tokens: [unclosed\n")
    argv = ["ca", "serve", "--authenticator", "local", "--ca-dir", str(tmp_path / "ca")]
    assert main([*argv, "--token-file", str(tmp_path / "tokens.yaml")]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML at line 2, column 1" in err and "fix it, or move it away" in err
    assert len(err.strip().splitlines()) == 1  # one line, not the YAML library's drawing


def _serve_argv(tmp_path: Path) -> list[str]:
    """`ca serve` of tmp_path/ca with the local tokens of tmp_path/tokens.yaml, on any free port."""
    return [
        *(
            "ca",
            "serve",
            "--authenticator",
            "local",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--listen",
            "127.0.0.1:0",
        ),
        *("--token-file", str(tmp_path / "tokens.yaml"), "--metrics-listen", ""),
    ]


def test_serve_with_a_signing_chain_not_valid_now_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CA signs its own serving certificate at start: a chain not valid yet (or expired) was a
    traceback (SigningUnavailable), not a line saying what to do."""
    import datetime as dt

    from ca import keys

    keys.bootstrap(tmp_path / "ca", "cluster.local", dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    assert main(["ca", "local-token", "--file", str(tmp_path / "tokens.yaml"), "--identity", "shop/a"]) == 0
    capsys.readouterr()
    assert main(_serve_argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "signing chain is not valid before" in err and "valid now" in err


def test_serve_with_material_of_another_trust_domain_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It served, and every workload refused what it signed (the bundle holds no root of its trust
    domain): an error at start instead, naming both trust domains."""
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca"), "--trust-domain", "example.org"]) == 0
    assert main(["ca", "local-token", "--file", str(tmp_path / "tokens.yaml"), "--identity", "shop/a"]) == 0
    capsys.readouterr()
    argv = _serve_argv(tmp_path)
    try:  # (a process: one that serves does not return; --trust-domain: cluster.local, the default)
        proc = subprocess.run(
            [sys.executable, "-m", "sidemesh", *argv], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("ca serve started with another trust domain's material")
    assert proc.returncode == 2, proc.stderr
    assert "example.org" in proc.stderr and "cluster.local" in proc.stderr and "--trust-domain" in proc.stderr


def test_serve_with_material_whose_svids_peers_would_refuse_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An intermediate for client use only (extendedKeyUsage clientAuth), valid from two minutes
    ahead (a cert-manager intermediate without backdating signs at once): it served, and every
    sidecar refused every server certificate it signed; the test handshake at start was skipped for
    material not valid yet. Refused at start, saying which use OpenSSL refused."""
    from cryptography.hazmat.primitives import hashes, serialization

    from ca import templates

    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    assert main(["ca", "local-token", "--file", str(tmp_path / "tokens.yaml"), "--identity", "shop/a"]) == 0
    capsys.readouterr()
    ca_dir = tmp_path / "ca"
    root = x509.load_pem_x509_certificate((ca_dir / keys.ROOTS).read_bytes())
    root_key = serialization.load_pem_private_key((ca_dir / keys.ROOT_KEY).read_bytes(), None)
    key = serialization.load_pem_private_key((ca_dir / keys.CA_KEY).read_bytes(), None)
    start = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "client-only intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)  # type: ignore[arg-type]
        .add_extension(templates.authority_key_id(root), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://cluster.local")]),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (ca_dir / keys.CA_CERT).write_bytes(keys.cert_pem(inter))
    (ca_dir / keys.CHAIN).write_bytes(keys.cert_pem(inter, root))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sidemesh", *_serve_argv(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("ca serve started with material whose server certificates every sidecar refuses")
    assert proc.returncode == 2, proc.stderr
    assert (
        "refused a test SVID as a TLS server" in proc.stderr
        and "unsuitable certificate purpose" in proc.stderr
    )


def test_a_second_ca_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    """grpc sets SO_REUSEPORT by default: a second CA on the same --listen shared the port and took
    half the calls with its own keys (clients: CERTIFICATE_VERIFY_FAILED)."""
    import time

    for name in ("a", "b"):
        assert main(["ca", "bootstrap", "--dir", str(tmp_path / name)]) == 0
    assert main(["ca", "local-token", "--file", str(tmp_path / "t.yaml"), "--identity", "shop/a"]) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def serve(name: str, stderr: int) -> subprocess.Popen[str]:
        argv = ["ca", "serve", "--authenticator", "local", "--token-file", str(tmp_path / "t.yaml")]
        argv += ["--ca-dir", str(tmp_path / name), "--listen", f"127.0.0.1:{port}", "--metrics-listen", ""]
        return subprocess.Popen(
            [sys.executable, "-m", "sidemesh", *argv], stderr=stderr, text=True, cwd=tmp_path
        )

    first = serve("a", subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the first one listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        second = serve("b", subprocess.PIPE)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 2, err
        assert f"cannot listen on --listen 127.0.0.1:{port}" in err
        # One line: grpc core's own (`add_port.cc ... Failed to add port`) came first before
        assert len(err.strip().splitlines()) == 1, err
    finally:
        first.terminate()
        first.wait(timeout=20)


def test_issue_with_only_another_trust_domains_roots_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ca issue` trusts the bundle's roots of the identity's trust domain only, as the components
    do (a foreign root could vouch for the CA's name and receive the token)."""
    main(["ca", "bootstrap", "--dir", str(tmp_path / "ca"), "--trust-domain", "partner.example"])
    capsys.readouterr()
    assert main(_issue_nowhere(tmp_path)) == 2
    assert "no root for trust domain 'cluster.local'" in capsys.readouterr().err


@pytest.mark.parametrize("kubeconfig", ["a: [\n", "- just\n- a list\n"])
def test_a_kubeconfig_that_cannot_be_read_is_a_usage_error(
    tmp_path: Path, kubeconfig: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not YAML, or not a mapping: "internal error ... please report it" (exit 70), where the
    controller and the injector say what to fix (exit 2)."""
    assert main(["ca", "bootstrap", "--dir", str(tmp_path / "ca")]) == 0
    (tmp_path / "kubeconfig").write_text(kubeconfig)
    capsys.readouterr()
    argv = ["ca", "serve", "--authenticator", "kubernetes", "--kubeconfig", str(tmp_path / "kubeconfig")]
    assert main([*argv, "--ca-dir", str(tmp_path / "ca"), "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sidemesh: error: cannot reach the Kubernetes API (") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--dns-names", "sidemesh-ca.\u00e9"),
        ("--dns-names", "two words"),
        ("--dns-names", "10.0.0.1,-bad-.svc"),
        ("--control-plane-dns", "sidemesh-system/sidemesh-controller=ctl_x.svc"),
    ],
)
def test_serve_with_a_name_that_cannot_be_a_dns_san_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """A non-ASCII name crashed `ca serve` (internal error, exit 70) when the serving certificate
    was made; spaces and other non-names went into a dNSName SAN."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: []\n")
    keys.bootstrap(tmp_path / "ca", "cluster.local", dt.datetime.now(dt.UTC))
    code = main(
        [
            "ca",
            "serve",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--authenticator",
            "local",
            "--token-file",
            str(tokens),
            flag,
            value,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and ("DNS name" in err or "ASCII" in err), err
    assert "internal error" not in err

"""The boot service and what it sets up on this machine: the files it renders, checked key by
key and rule by rule (and by the system's own tools where they are here), and, as root on
Linux, install / install again / uninstall for real inside a sandbox that keeps the real
/etc, trust store and firewall out of it."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlxgate import PROJECT_ROOT
from mlxgate.system import forwarding, service
from support import ROOT, Sandbox, ensure_tool, free_port, mlxgate, tree

LINUX_ROOT = pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                                reason="installs for real: needs root on Linux (network and mount namespaces)")
MLXGATE_BIN = str(Path(sys.executable).parent / "mlxgate")


def _lint(path: Path) -> None:
    if shutil.which("plutil"):  # macOS
        subprocess.run(["plutil", "-lint", str(path)], check=True)


def test_the_launch_agent_starts_at_login_comes_back_and_does_not_loop(tmp_path):
    agent = service.Launchd(home=tmp_path, uid=501)
    env = {"MLXGATE_HOME": "/Users/me/.mlxgate", "PATH": "/usr/bin:/bin"}
    log = Path("/Users/me/.mlxgate/logs/service.log")
    rendered = agent.render(["--port", "8080", "--default-model", "a & <b>"], env, log)
    (tmp_path / "agent.plist").write_bytes(rendered)
    _lint(tmp_path / "agent.plist")
    plist = plistlib.loads(rendered)
    assert plist["Label"] == "com.mlxgate.gateway"
    assert plist["ProgramArguments"] == [MLXGATE_BIN, "start", "--foreground", "--blocked-exit-code", "0",
                                         "--port", "8080", "--default-model", "a & <b>"]
    assert plist["EnvironmentVariables"] == env
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart on failure; 0 = stopped or blocked
    assert plist["ThrottleInterval"] == 30
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(log)
    assert plist["WorkingDirectory"] == str(PROJECT_ROOT)
    assert set(plist) == {"Label", "ProgramArguments", "EnvironmentVariables", "WorkingDirectory", "RunAtLoad",
                          "KeepAlive", "ThrottleInterval", "ExitTimeOut", "ProcessType", "StandardOutPath",
                          "StandardErrorPath"}


def test_launchctl_is_driven_with_bootstrap_bootout_and_kickstart(tmp_path):
    calls = []

    def run(argv, check=True):
        calls.append(argv)
        said = "state = running\n" if argv[:2] == ["launchctl", "print"] else ""
        return subprocess.CompletedProcess(argv, 0, said, "")

    agent = service.Launchd(home=tmp_path, run=run, uid=501)
    agent.install(["--port", "8080"], {"MLXGATE_HOME": "/h"}, Path("/h/logs/service.log"), say=lambda _: None)
    target = "gui/501/com.mlxgate.gateway"
    assert calls == [["launchctl", "bootout", target], ["plutil", "-lint", str(agent.path)],
                     ["launchctl", "enable", target], ["launchctl", "bootstrap", "gui/501", str(agent.path)]]
    assert agent.state().active is True
    calls.clear()
    agent.stop(), agent.start(), agent.restart()
    assert calls == [["launchctl", "kill", "TERM", target], ["launchctl", "kickstart", target],
                     ["launchctl", "kickstart", "-k", target]]
    agent.uninstall(say=lambda _: None)
    assert not agent.path.exists()


def test_the_pf_anchor_forwards_443_and_80_on_loopback_only():
    anchor = forwarding.pf_anchor(forwarding.forwards(11433, 11432))
    rules = [line for line in anchor.splitlines() if line and not line.startswith("#")]
    assert rules == ["rdr pass on lo0 inet proto tcp from any to 127.0.0.1 port 443 -> 127.0.0.1 port 11433",
                     "rdr pass on lo0 inet proto tcp from any to 127.0.0.1 port 80 -> 127.0.0.1 port 11432"]
    for rule in rules:
        words = rule.split()
        assert words[:4] == ["rdr", "pass", "on", "lo0"] and "127.0.0.1" == words[words.index("to") + 1]
    listed = ("rdr pass on lo0 inet proto tcp from any to 127.0.0.1 port = 443 -> 127.0.0.1 port 11433\n"
              "rdr pass on lo0 inet proto tcp from any to 127.0.0.1 port = 80 -> 127.0.0.1 port 11432\n")
    assert forwarding.loaded_pf(listed) == [(443, 11433), (80, 11432)]  # as `pfctl -s nat` shows them


def test_the_pf_launch_daemon_loads_the_anchor_at_boot(tmp_path):
    daemon = plistlib.loads(forwarding.pf_daemon())
    (tmp_path / "pf.plist").write_bytes(forwarding.pf_daemon())
    _lint(tmp_path / "pf.plist")
    assert daemon["Label"] == "com.mlxgate.pf" and daemon["RunAtLoad"] is True
    assert daemon["ProgramArguments"] == ["/sbin/pfctl", "-E", "-a", "com.apple/mlxgate", "-f",
                                          "/etc/pf.anchors/com.mlxgate"]
    assert "KeepAlive" not in daemon  # a one-shot load


def test_the_keychain_steps_trust_and_forget_the_authority_by_its_own_fingerprint(tmp_path):
    """macOS only as command lines here: what `--trust-ca` and `--uninstall` give `security`."""
    from mlxgate.certs import CA_CERT, ensure_ca
    from mlxgate.system import trust

    ensure_ca(tmp_path)
    ca = tmp_path / CA_CERT
    ran = []

    def run(argv, check=True):
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0)
    trust.add(ca, platform="darwin", run=run)
    assert trust.trusted(ca, platform="darwin", run=run)
    sha1 = trust.fingerprint(ca)
    trust.remove(ca, platform="darwin", run=run, sha1=sha1)
    assert ran == [["security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k",
                    "/Library/Keychains/System.keychain", str(ca)],
                   ["security", "verify-cert", "-c", str(ca)],
                   ["security", "remove-trusted-cert", "-d", str(ca)],
                   ["security", "delete-certificate", "-Z", sha1, "/Library/Keychains/System.keychain"]]
    assert re.fullmatch(r"[0-9A-F]{40}", sha1)  # the form `security delete-certificate -Z` takes


def test_doctor_names_a_set_skip_on_lo0_in_pf_conf(tmp_path):
    conf = tmp_path / "pf.conf"
    conf.write_text('scrub-anchor "com.apple/*"\nrdr-anchor "com.apple/*"\n')
    assert forwarding.pf_skips_loopback(conf) is None
    conf.write_text('set skip on { lo0 en0 }  # hand-written\nrdr-anchor "com.apple/*"\n')
    assert forwarding.pf_skips_loopback(conf) == "set skip on { lo0 en0 }  # hand-written"


def _unit_lines(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            keys.setdefault(f"{section}.{key}", []).append(value)
    return keys


@pytest.fixture
def verify(tmp_path):
    tool = ensure_tool("systemd-analyze", "systemd")
    if tool is None:
        pytest.skip("systemd-analyze is not here and cannot be installed")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)

    def check(unit: Path) -> str:
        result = subprocess.run([tool, "--user", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                                env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))
        assert result.returncode == 0, result.stderr
        return result.stderr
    return check


def test_the_systemd_user_unit_restarts_always_but_not_on_a_blocked_start(tmp_path, verify):
    unit = service.Systemd(home=tmp_path, version=252)
    text = unit.render(["--port", "8080", "--default-model", "my model%"], {"MLXGATE_HOME": "/h/.mlxgate"},
                       Path("/h/.mlxgate/logs/service.log"))
    keys = _unit_lines(text)
    assert keys["Service.ExecStart"] == [f'{MLXGATE_BIN} start --foreground --port 8080 --default-model "my model%%"']
    assert keys["Service.Restart"] == ["always"] and keys["Service.RestartPreventExitStatus"] == ["78"]
    assert keys["Service.RestartSec"] == ["5"] and keys["Unit.StartLimitIntervalSec"] == ["0"]
    assert keys["Service.Environment"] == ["MLXGATE_HOME=/h/.mlxgate"]
    assert keys["Service.KillMode"] == ["mixed"]  # SIGTERM to supervisord alone: it stops its programs
    assert keys["Service.StandardOutput"] == ["append:/h/.mlxgate/logs/service.log"]
    assert keys["Install.WantedBy"] == ["default.target"]
    path = tmp_path / "mlxgate.service"
    path.write_text(text)
    assert verify(path) == ""  # not a warning

    newer = service.Systemd(home=tmp_path, version=256).render([], {}, Path("/h/service.log"))
    keys = _unit_lines(newer)
    assert keys["Service.RestartSteps"] == ["5"] and keys["Service.RestartMaxDelaySec"] == ["120"]
    path.write_text(newer)
    warnings = verify(path)
    here = int(re.search(r"systemd (\d+)", subprocess.run(["systemctl", "--version"], capture_output=True,
                                                           text=True).stdout)[1])
    if here >= 254:
        assert warnings == ""
    else:  # this systemd predates the back-off keys: they are its only complaint
        assert {re.sub(r".*Unknown key '(\w+)'.*", r"\1", w) for w in warnings.splitlines()} == \
            {"RestartSteps", "RestartMaxDelaySec"}


def test_the_nftables_rules_and_their_boot_unit(tmp_path, verify):
    ruleset = forwarding.nft_ruleset(forwarding.forwards(11433, 11432))
    rules = [line.strip() for line in ruleset.splitlines() if "redirect" in line]
    assert rules == ['oifname "lo" ip daddr 127.0.0.1 tcp dport 443 redirect to :11433',
                     'oifname "lo" ip daddr 127.0.0.1 tcp dport 80 redirect to :11432']
    assert "type nat hook output priority -100; policy accept;" in ruleset
    assert ruleset.index("delete table ip mlxgate") < ruleset.index("table ip mlxgate {")  # loading replaces
    unit = tmp_path / "mlxgate-forward.service"
    unit.write_text(forwarding.nft_unit("/usr/sbin/nft"))
    keys = _unit_lines(unit.read_text())
    assert keys["Service.ExecStart"] == ["/usr/sbin/nft -f /etc/mlxgate/forward.nft"]
    assert keys["Service.ExecStop"] == ["/usr/sbin/nft delete table ip mlxgate"]
    assert keys["Service.Type"] == ["oneshot"] and keys["Install.WantedBy"] == ["multi-user.target"]


# ---------------------------------------------------------------- for real, as root, in a sandbox
@pytest.fixture
def sandbox(tmp_path):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("installs for real: needs root on Linux (network and mount namespaces)")
    if ensure_tool("nft", "nftables") is None or ensure_tool("update-ca-certificates", "ca-certificates") is None:
        pytest.skip("nftables or ca-certificates is not here and cannot be installed")
    # the sandbox has no network: its install.sh finds the dependencies installed (as CI's first step did)
    subprocess.run([str(ROOT / "install.sh"), "--no-service", "--quiet"], check=True, capture_output=True)
    made = Sandbox(tmp_path / "sandbox")
    yield made
    made.close()


def _user_env(home: Path, models: Path, **extra) -> dict:
    """A user whose home is empty: HOME, the runtime folder and certificates all under it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "XDG_"))}
    return dict(env, HOME=str(home), MLXGATE_CONFIG=str(home.parent / "none.yaml"), PIP_CACHE_DIR=str(home.parent / "pip"),
                MLXGATE_SSL_DIR=str(home.parent / "ssl"), MLXGATE_MODEL_DIRS=str(models), **extra)


def test_install_install_again_and_uninstall_leave_nothing_behind(sandbox, models_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home, models_dir)
    port, https_port = free_port(), free_port()
    first = sandbox.run(["./install.sh", "--quiet", "--port", str(port), "--https-port", str(https_port),
                         "--default-model", "tiny-a", "--ssl-domain", "api.anthropic.com", "--stand-in-any-key",
                         "--enable-port-forward", "--forward-http", "--trust-ca"], env=env, check=True)
    said = first.stdout
    assert "These steps need root:" in said and "add `127.0.0.1 api.anthropic.com` to /etc/hosts" in said
    assert "systemd's user manager is not running here" in said and "start --foreground" in said

    unit = home / ".config/systemd/user/mlxgate.service"
    keys = _unit_lines(unit.read_text())
    assert keys["Service.ExecStart"] == [f"{MLXGATE_BIN} start --foreground --default-model tiny-a --port {port} "
                                         f"--enable-https --https-port {https_port} --ssl-domain api.anthropic.com "
                                         f"--stand-in-any-key"]
    assert f"MLXGATE_MODEL_DIRS={models_dir}" in keys["Service.Environment"]
    assert (home / ".config/systemd/user/default.target.wants/mlxgate.service").is_symlink()  # enabled
    hosts = (sandbox.etc / "hosts").read_text()
    assert "127.0.0.1\tapi.anthropic.com\t# added by mlxgate" in hosts
    rules = sandbox.nft_ruleset()
    assert f"tcp dport 443 redirect to :{https_port}" in rules and f"tcp dport 80 redirect to :{port}" in rules
    assert (sandbox.etc / "systemd/system/multi-user.target.wants/mlxgate-forward.service").is_symlink()
    ca = (tmp_path / "ssl" / "ca.pem").read_text()
    assert ca.strip() in (sandbox.etc / "ssl/certs/ca-certificates.crt").read_text()
    status = sandbox.run([MLXGATE_BIN, "status"], env=env)
    assert re.search(r"boot service\s+ENABLED\s+systemd .*: enabled, systemd's user manager is not running",
                     status.stdout), status.stdout

    again = sandbox.run(["./install.sh", "--quiet", "--port", str(port), "--https-port", str(https_port),
                         "--default-model", "tiny-a", "--ssl-domain", "api.anthropic.com", "--enable-port-forward"],
                        env=env, check=True)
    assert "undo: add the certificate authority" in again.stdout
    assert (sandbox.etc / "hosts").read_text().count("api.anthropic.com") == 1  # in place, not twice
    rules = sandbox.nft_ruleset()
    assert f"dport 443 redirect to :{https_port}" in rules and "dport 80" not in rules
    assert ca.strip() not in (sandbox.etc / "ssl/certs/ca-certificates.crt").read_text()
    assert "--stand-in-any-key" not in unit.read_text()

    gone = sandbox.run(["./install.sh", "--uninstall"], env=env, check=True)
    assert "mlxgate is uninstalled" in gone.stdout
    assert tree(home) == []
    assert sandbox.nft_ruleset().strip() == ""
    assert sandbox.changed_in_etc() == []
    assert tree(sandbox.anchors) == sorted(p.name for p in Path("/usr/local/share/ca-certificates").iterdir())


def test_a_failed_root_step_undoes_what_the_run_did(sandbox, models_dir, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nft").write_text("#!/bin/sh\necho 'Error: Could not process rule: No such file or directory' >&2\nexit 1\n")
    (fake / "nft").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home, models_dir, PATH=f"{fake}:{os.environ['PATH']}")
    result = sandbox.run([MLXGATE_BIN, "service", "install", "--no-service", "--ssl-domain", "api.anthropic.com",
                          "--enable-port-forward"], env=env)
    assert result.returncode == 1
    assert "step failed: forward loopback ports 443 ->" in result.stderr and "Could not process rule" in result.stderr
    assert "undo: add `127.0.0.1 api.anthropic.com`" in result.stdout
    assert sandbox.changed_in_etc() == []


# ---------------------------------------------------------------- doctor, broken on purpose
def _doctor(env: dict, runner=None) -> tuple[int, str]:
    result = runner(["python", "-m", "mlxgate.cli", "doctor"], env=env) if runner else mlxgate("doctor", env=env)
    return result.returncode, result.stdout


def test_doctor_finds_a_taken_port_a_readable_key_and_a_missing_model(models_dir, tmp_path):
    home = tmp_path / "home"
    models = tmp_path / "models"
    shutil.copytree(models_dir / "tiny-a", models / "tiny-a")
    env = dict(os.environ, MLXGATE_HOME=str(home), MLXGATE_CONFIG=str(tmp_path / "none.yaml"),
               MLXGATE_MODEL_DIRS=str(models), HF_HUB_CACHE=str(tmp_path / "hf"), MLXGATE_PORT=str(free_port()),
               MLX_WRAPPER_URL=f"http://127.0.0.1:{free_port()}", MLX_DYNAMIC_PORT=str(free_port()),
               MLX_AUTOCOMPLETE_PORT=str(free_port()), MLXGATE_DEFAULT_MODEL="tiny-a")
    mlxgate("env", env=env)  # nothing yet
    from mlxgate.runtime_files import ensure_api_key
    ensure_api_key(home)
    code, said = _doctor(env)
    assert code == 0, said
    assert "ok    default_model: tiny-a is on this machine" in said

    (home / "api_key").chmod(0o644)
    shutil.rmtree(models / "tiny-a")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(env["MLXGATE_PORT"])))
        busy.listen()
        code, said = _doctor(env)
    assert code == 1
    assert f"FAIL  API key: {home / 'api_key'} is mode 644: other users can read the key" in said
    assert f"fix: chmod 600 {home / 'api_key'}" in said
    assert f"FAIL  ports: port {env['MLXGATE_PORT']} (port) is taken by pid {os.getpid()}" in said
    assert "FAIL  default_model: model 'tiny-a' (default_model) is not on this machine" in said
    assert "mlxgate download tiny-a" in said and "mlxgate demo-model" in said


def _leaf(ssl: Path, domain: str | None, days: int, names: list[str], ours: bool = True) -> None:
    """Put a certificate under the seed's name: issued by our authority, or by someone else."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from mlxgate.certs import ensure_ca, leaf_paths

    ca_cert, ca_key, _ = ensure_ca(ssl)
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = ca_cert.subject if ours else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Someone's CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca_key if ours else key, hashes.SHA256()))
    cert_path, key_path = leaf_paths(ssl, domain)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def test_doctor_finds_an_expired_certificate_and_one_without_the_domain(tmp_path):
    ssl = tmp_path / "ssl"
    env = dict(os.environ, MLXGATE_HOME=str(tmp_path / "home"), MLXGATE_CONFIG=str(tmp_path / "none.yaml"),
               MLXGATE_SSL_DIR=str(ssl), MLXGATE_SSL_DOMAIN="api.anthropic.com", MLXGATE_ENABLE_HTTPS="true",
               MLXGATE_API_KEY="k", MLXGATE_PORT=str(free_port()), MLXGATE_HTTPS_PORT=str(free_port()))
    mlxgate("cert", "--domain", "api.anthropic.com", env=env, check=True)
    code, said = _doctor(env)
    assert code == 0 and "ok    certificate:" in said and "made by mlxgate" in said, said

    _leaf(ssl, "api.anthropic.com", days=-1, names=["localhost", "api.anthropic.com"])
    code, said = _doctor(env)
    assert code == 1 and re.search(r"FAIL  certificate: .*cert_apianthropiccom.pem expired on ", said), said
    assert "fix: `mlxgate cert --domain api.anthropic.com` makes a new one" in said

    _leaf(ssl, "api.anthropic.com", days=90, names=["localhost"], ours=False)  # yours, without the domain
    code, said = _doctor(env)
    assert code == 1 and "is not valid for api.anthropic.com (it names localhost)" in said, said
    assert "(yours: mlxgate never overwrites them)" in said
    before = (ssl / "cert_apianthropiccom.pem").read_bytes()
    mlxgate("cert", "--domain", "api.anthropic.com", env=env, check=True)
    assert (ssl / "cert_apianthropiccom.pem").read_bytes() == before, "a certificate of yours is never replaced"


def test_doctor_finds_a_missing_hosts_line_and_forwarding_rule(sandbox, models_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home, models_dir)
    sandbox.run([MLXGATE_BIN, "service", "install", "--no-service", "--ssl-domain", "api.anthropic.com",
                 "--enable-port-forward", "--https-port", str(free_port()), "--port", str(free_port())],
                env=env, check=True)
    code, said = _doctor(env, runner=sandbox_runner(sandbox))
    assert code == 0, said
    assert "ok    hosts entry: api.anthropic.com -> 127.0.0.1" in said and "ok    forwarding: 443 ->" in said

    hosts = sandbox.etc / "hosts"
    hosts.write_text("".join(line + "\n" for line in hosts.read_text().splitlines() if "mlxgate" not in line))
    sandbox.run(["nft", "delete", "table", "ip", "mlxgate"], env=env, check=True)
    code, said = _doctor(env, runner=sandbox_runner(sandbox))
    assert code == 1
    assert "FAIL  hosts entry: /etc/hosts has no `127.0.0.1 api.anthropic.com` line of mlxgate's" in said
    assert "FAIL  forwarding: no rule forwards 443 ->" in said
    assert said.count("fix: run ./install.sh again with") == 2
    sandbox.run([MLXGATE_BIN, "service", "uninstall"], env=env, check=True)
    assert sandbox.changed_in_etc() == []


def sandbox_runner(sandbox: Sandbox):
    return lambda argv, env: sandbox.run([sys.executable, *argv[1:]], env=env)


def test_install_sh_refuses_an_unknown_flag_and_documents_every_flag():
    result = subprocess.run([str(ROOT / "install.sh"), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown option --bogus (try --help)" in result.stderr
    usage = subprocess.run([str(ROOT / "install.sh"), "--help"], capture_output=True, text=True).stdout
    readme = (PROJECT_ROOT / "docs" / "install.md").read_text()
    for flag in ("--port", "--https-port", "--max-tokens", "--default-model", "--autocomplete-model",
                 "--enable-https", "--ssl-domain", "--enable-port-forward", "--use-sudo", "--download-model",
                 "--install-dependencies", "--no-service", "--quiet", "--uninstall", "--help", "--trust-ca",
                 "--forward-http", "--enable-linger", "--stand-in-any-key"):
        assert flag in usage, f"install.sh --help does not mention {flag}"
        assert f"`{flag}" in readme or f" {flag}" in readme, f"docs/install.md does not mention {flag}"

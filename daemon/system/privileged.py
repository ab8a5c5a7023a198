"""The steps of an install that need root, run together in one process so sudo is
asked for once: `sudo python -m mlxgate.system.privileged` reads the plan (JSON) on
stdin. Each step says what it does, does it, and can undo it; when one fails, the
steps this run changed are undone in reverse order and the run fails.

A step is described by a small dict (its `spec`), which is also what the install
record keeps, so a later run can remove what an earlier one added."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..errors import MlxgateError
from . import etc_hosts, forwarding, run, trust


class Step:
    kind = ""

    def __init__(self, **spec):
        self.spec = {"kind": self.kind, **spec}

    def describe(self) -> str:
        raise NotImplementedError

    def apply(self) -> bool:
        """Do it; False when it was already in place (so a failed run does not undo it)."""
        raise NotImplementedError

    def undo(self) -> None:
        raise NotImplementedError

    def present(self) -> bool:
        """Whether a trace of it is on this machine (checked without root)."""
        raise NotImplementedError


class EtcHostsLine(Step):
    """The marked /etc/hosts line that sends the stood-in domain here (kind kept as written in records)."""
    kind = "hosts"

    def describe(self) -> str:
        return f"add `127.0.0.1 {self.spec['domain']}` to {self.spec['file']} (a marked line)"

    def apply(self) -> bool:
        return etc_hosts.add(self.spec["domain"], Path(self.spec["file"]))

    def undo(self) -> None:
        etc_hosts.remove(Path(self.spec["file"]))

    def present(self) -> bool:
        return any(etc_hosts.MARK in line for line in etc_hosts.lines(Path(self.spec["file"])))


class _Forwarding(Step):
    """A step that forwards loopback ports (`spec["forwards"]`: pairs of from, to)."""

    @property
    def rules(self) -> list[forwarding.Forward]:
        return [tuple(f) for f in self.spec["forwards"]]

    @property
    def ports(self) -> str:
        return ", ".join(f"{a} -> {b}" for a, b in self.rules)


class NftForward(_Forwarding):
    """nftables rules now, and a system unit that loads them at boot where systemd is."""

    kind = "nft"

    def describe(self) -> str:
        return (f"forward loopback ports {self.ports} with nftables (table ip mlxgate; rules in "
                f"{forwarding.NFT_FILE}, loaded at boot by {forwarding.NFT_UNIT.name})")

    def apply(self) -> bool:
        nft = shutil.which("nft")
        if nft is None:
            raise MlxgateError("nft is not installed: install nftables (apt-get install nftables, or "
                               "./install.sh --install-dependencies)")
        forwarding.NFT_FILE.parent.mkdir(parents=True, exist_ok=True)
        forwarding.NFT_FILE.write_text(forwarding.nft_ruleset(self.rules))
        run([nft, "-f", str(forwarding.NFT_FILE)])
        if shutil.which("systemctl"):
            forwarding.NFT_UNIT.write_text(forwarding.nft_unit(nft))
            run(["systemctl", "enable", forwarding.NFT_UNIT.name])
        return True

    def undo(self) -> None:
        nft = shutil.which("nft")
        if nft:
            run([nft, "delete", "table", *forwarding.NFT_TABLE], check=False)
        if forwarding.NFT_UNIT.exists():
            run(["systemctl", "disable", forwarding.NFT_UNIT.name], check=False)
            forwarding.NFT_UNIT.unlink()
        forwarding.NFT_FILE.unlink(missing_ok=True)
        _remove_empty(forwarding.NFT_FILE.parent)

    def present(self) -> bool:
        # the rules themselves can only be listed by root; the files say they were loaded
        return forwarding.NFT_FILE.exists() or forwarding.NFT_UNIT.exists()


class PfForward(_Forwarding):
    """A pf anchor, loaded now and at boot by a LaunchDaemon."""

    kind = "pf"

    def describe(self) -> str:
        return (f"forward loopback ports {self.ports} with pf (anchor {forwarding.ANCHOR} from "
                f"{forwarding.ANCHOR_FILE}, loaded at boot by {forwarding.PF_PLIST})")

    def apply(self) -> bool:
        forwarding.ANCHOR_FILE.parent.mkdir(parents=True, exist_ok=True)
        forwarding.ANCHOR_FILE.write_text(forwarding.pf_anchor(self.rules))
        forwarding.PF_PLIST.write_bytes(forwarding.pf_daemon())
        run(["launchctl", "bootout", f"system/{forwarding.PF_LABEL}"], check=False)  # an older one
        run(["launchctl", "bootstrap", "system", str(forwarding.PF_PLIST)])
        return True

    def undo(self) -> None:
        run(["launchctl", "bootout", f"system/{forwarding.PF_LABEL}"], check=False)
        run(["pfctl", "-a", forwarding.ANCHOR, "-F", "all"], check=False)
        token = _pf_token(forwarding.PF_LOG)
        if token:
            run(["pfctl", "-X", token], check=False)
        for path in (forwarding.PF_PLIST, forwarding.ANCHOR_FILE, forwarding.PF_LOG):
            path.unlink(missing_ok=True)

    def present(self) -> bool:
        return forwarding.PF_PLIST.exists() or forwarding.ANCHOR_FILE.exists()


def _pf_token(log: Path) -> str | None:
    """The reference `pfctl -E` took (it prints `Token : N`), to give it back."""
    try:
        found = [line.split(":", 1)[1].strip() for line in log.read_text().splitlines()
                 if line.startswith("Token")]
    except OSError:
        return None
    return found[-1] if found else None


class TrustCA(Step):
    kind = "trust"

    def describe(self) -> str:
        where = "the System keychain" if sys.platform == "darwin" else f"{trust.LINUX_ANCHORS} (update-ca-certificates)"
        return f"add the certificate authority {self.spec['ca']} to the system trust store: {where}"

    def apply(self) -> bool:
        ca = Path(self.spec["ca"])
        if trust.trusted(ca):
            return False
        trust.add(ca)
        return True

    def undo(self) -> None:
        trust.remove(Path(self.spec["ca"]), sha1=self.spec.get("sha1"))

    def present(self) -> bool:
        if sys.platform == "darwin":
            return bool(self.spec.get("sha1"))
        return (trust.LINUX_ANCHORS / trust.LINUX_NAME).exists()


class Linger(Step):
    kind = "linger"

    def describe(self) -> str:
        return f"let {self.spec['user']}'s services run without a login (loginctl enable-linger)"

    def apply(self) -> bool:
        run(["loginctl", "enable-linger", self.spec["user"]])
        return True

    def undo(self) -> None:
        run(["loginctl", "disable-linger", self.spec["user"]], check=False)

    def present(self) -> bool:
        return Path("/var/lib/systemd/linger", self.spec["user"]).exists()


STEPS = {cls.kind: cls for cls in (EtcHostsLine, NftForward, PfForward, TrustCA, Linger)}


def from_spec(spec: dict) -> Step:
    fields = {k: v for k, v in spec.items() if k != "kind"}
    return STEPS[spec["kind"]](**fields)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def execute(apply: list[Step], remove: list[Step], say: Callable[[str], None] = print) -> None:
    """Undo `remove`, then do `apply`; when a step fails, undo what this run changed."""
    for step in remove:
        say(f"  undo: {step.describe()}")
        step.undo()
    changed: list[Step] = []
    for step in apply:
        say(f"  {step.describe()}")
        try:
            if step.apply():
                changed.append(step)
        except Exception as exc:  # any failure: put back what this run did, then report
            for done in reversed(changed):
                say(f"  undo: {done.describe()}")
                try:
                    done.undo()
                except Exception as again:
                    say(f"  (could not undo: {again})")
            try:
                step.undo()  # its own half-done work
            except Exception:
                pass
            raise MlxgateError(f"step failed: {step.describe()}: {exc}. What this run changed before it "
                               f"was undone.") from None


def run_as_root(apply: list[Step], remove: list[Step], say: Callable[[str], None] = print) -> None:
    """Run the steps as root: here when we are root, else through one `sudo`."""
    if not apply and not remove:
        return
    if os.geteuid() == 0:
        execute(apply, remove, say)
        return
    if shutil.which("sudo") is None:
        raise MlxgateError("these steps need root and sudo is not installed: run ./install.sh as root")
    plan = json.dumps({"apply": [s.spec for s in apply], "remove": [s.spec for s in remove]})
    say("sudo asks for your password once for these steps:")
    result = subprocess.run(["sudo", sys.executable, "-m", "mlxgate.system.privileged"], input=plan, text=True)
    if result.returncode != 0:
        raise MlxgateError("the steps that need root failed (see above); what they changed was undone")


def main() -> int:
    plan = json.load(sys.stdin)
    try:
        execute([from_spec(s) for s in plan["apply"]], [from_spec(s) for s in plan["remove"]])
    except MlxgateError as exc:
        print(f"mlxgate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

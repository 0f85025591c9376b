"""A detached, armored GPG signature of ``repomd.xml`` (``repomd.xml.asc``),
made with Debian's ``gpg`` and the configured key; clients check it with
``gpgv`` or their package manager."""
from __future__ import annotations

from pathlib import Path

from participants.argsafety import operand
from participants.repo.config import Signing

GPG = "gpg"


def sign_argv(signing: Signing, file: Path) -> list[str]:
    argv = [GPG, "--batch", "--yes", "--no-tty", "--pinentry-mode", "error"]
    if signing.gnupg_home:
        argv += ["--homedir", operand(signing.gnupg_home, "gnupg_home")]
    return argv + ["--local-user", operand(signing.key, "sign key"), "--detach-sign", "--armor",
                   "--output", operand(str(file) + ".asc", "signature"), operand(str(file), "file")]

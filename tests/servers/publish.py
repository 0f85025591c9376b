"""Fixtures and helpers for publishing repositories: a real rsync daemon and
OpenSSH server on 127.0.0.1 (``tests/serverkit/rsyncd.py``, ``sshd.py``), a
throwaway GnuPG key, test trees whose every file carries its snapshot's
marker, and engines running the repository participants.

A missing binary skips on a laptop and fails under CI (``tests.servers.need``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from bot.access import Directory, User
from engine.configkit import Findings, Section
from engine.engine import Engine
from engine.participant_runtime import ParticipantEnv
from engine.participants import ParticipantRegistry
from engine.yamlconfig import loads_yaml
from participants.builtin import Echo, Hold
from participants.repo import RepoLock, RepoPublish, RepoRollback, RepoSign, RepoSync, RepoVerify
from participants.repo.config import RepoConfig, check_section
from tests.servers import need, require_binary
from tests.serverkit.repotree import markers, published, write_tree
from tests.serverkit.rsyncd import Rsyncd, start_rsyncd
from tests.serverkit.sshd import Sshd, start_sshd


PUBLISH = """\
name: publish
project: Project:Devel
launch_roles: [publishers]
inputs: {repo: str, force: bool}
fields: {repo: devel, force: false}
steps:
  - {id: lock, participant: repo_lock, params: {repo: "{{ repo }}", force: "{{ force }}"}}
  - {id: sync, participant: repo_sync, params: {repo: "{{ repo }}"}}
  - {id: verify, participant: repo_verify, params: {repo: "{{ repo }}"}}
  - {id: sign, participant: repo_sign, params: {repo: "{{ repo }}"}}
  - {id: publish, participant: repo_publish, params: {repo: "{{ repo }}", force: "{{ force }}"}}
"""
ROLLBACK = """\
name: rollback
project: Project:Devel
launch_roles: [publishers]
inputs: {repo: str}
fields: {repo: devel}
steps:
  - {id: lock, participant: repo_lock, params: {repo: "{{ repo }}"}}
  - {id: rollback, participant: repo_rollback, params: {repo: "{{ repo }}"}}
"""


__all__ = ["GpgKey", "PUBLISH", "ROLLBACK", "config_for", "config_from", "family_of", "markers", "published",
           "repo_engine", "repo_participants", "settle", "write_tree"]


def repo_participants() -> list[Any]:
    return [RepoLock(), RepoSync(), RepoVerify(), RepoSign(), RepoPublish(), RepoRollback()]


def config_from(text: str) -> tuple[RepoConfig, list[str]]:
    """``repo_publish``'s section from YAML text, checked as ``check`` does: the config and the problems."""
    findings = Findings(need_secrets=False)
    node = loads_yaml(textwrap.dedent(text), "bot.yaml")
    config = check_section(Section(node, "bot.yaml", findings, label="participants repo_publish"))
    return config, [str(p) for p in findings.problems]


def config_for(repos: Mapping[str, Mapping[str, Any]], **top: Any) -> RepoConfig:
    import json

    text = json.dumps({**top, "repositories": repos})
    config, problems = config_from(text)
    assert not problems, problems
    return config


# -- engines -------------------------------------------------------------------------

USERS = [User("admin", roles={"*": frozenset({"admins"})}),
         User("alice", roles={"Project": frozenset({"publishers"})}),
         User("olga", roles={"Project:Devel": frozenset({"publishers", "publishers-override"})})]


async def repo_engine(engines: Any, config: RepoConfig, *, definitions: Mapping[str, str] | None = None,
                      **kwargs: Any) -> Engine:
    """A started engine with echo, hold and the repository participants, configured with ``config``."""
    registry = ParticipantRegistry([Echo(), Hold(), *repo_participants()])
    env = ParticipantEnv(config={"repo_publish": config}, users=Directory(USERS))
    engine: Engine = await engines(dict(definitions or {"publish": PUBLISH, "rollback": ROLLBACK}),
                                   registry=registry, participant_env=env, **kwargs)
    return engine


async def settle(engine: Engine, timeout: float = 30) -> None:
    """Wait until the engine and the repository participants' own tasks (lock grants) are quiet."""
    family = family_of(engine)
    while True:
        await engine.idle(timeout=timeout)
        if not await family.idle():
            await engine.idle(timeout=timeout)
            if not any(not t.done() for t in family.tasks):
                return


def family_of(engine: Engine) -> Any:
    participant = engine.participants.get("repo_publish")
    assert isinstance(participant, RepoPublish) and participant.family is not None
    return participant.family


# -- servers -------------------------------------------------------------------------

@pytest.fixture
def rsync_bin() -> str:
    return require_binary("rsync")


@pytest.fixture
def rsyncd(tmp_path: Path, rsync_bin: str) -> Iterator[Rsyncd]:
    server = need(lambda: start_rsyncd(tmp_path / "rsyncd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sshd(rsync_bin: str) -> Iterator[Sshd]:
    server = need(lambda: start_sshd())
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@dataclass
class GpgKey:
    home: Path              # GNUPGHOME holding the secret key (short: gpg-agent's socket path)
    fingerprint: str
    public: Path            # the binary public key, for gpgv --keyring


@pytest.fixture
def gpg_key() -> Iterator[GpgKey]:
    gpg = require_binary("gpg")
    require_binary("gpgv")
    home = Path(tempfile.mkdtemp(prefix="gpg."))
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        subprocess.run([gpg, "--batch", "--passphrase", "", "--quick-gen-key", "Test Repo <repo@example.test>",
                        "ed25519", "sign", "never"], env=env, check=True, capture_output=True)
        out = subprocess.run([gpg, "--batch", "--with-colons", "--list-keys", "repo@example.test"], env=env,
                             check=True, capture_output=True, text=True).stdout
        fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr"))
        public = home / "pub.gpg"
        public.write_bytes(subprocess.run([gpg, "--batch", "--export", fpr], env=env, check=True,
                                          capture_output=True).stdout)
        yield GpgKey(home, fpr, public)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)

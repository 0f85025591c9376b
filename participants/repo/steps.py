"""The repository steps as participants.  Each is thin: it checks its
params, finds its repository, and asks the family (``family.py``) to act.

    - {id: lock, participant: repo_lock, params: {repo: "{{ repo }}", force: "{{ force }}"}}
    - {id: sync, participant: repo_sync, params: {repo: "{{ repo }}"}}
    - {id: verify, participant: repo_verify, params: {repo: "{{ repo }}"}}
    - {id: sign, participant: repo_sign, params: {repo: "{{ repo }}"}}
    - {id: publish, participant: repo_publish, params: {repo: "{{ repo }}", force: "{{ force }}"}}
    - {id: rollback, participant: repo_rollback, params: {repo: "{{ repo }}"}}

``repo_lock`` also takes ``wait: false`` (refuse with the holder's instance
id instead of waiting in line).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Mapping, Sequence

from engine.configkit import Section
from engine.participants import Participant, Reply, Services, Workitem
from participants.argsafety import is_template
from participants.repo.config import RepoConfig, check_section, name_problem
from participants.repo.family import MIGRATIONS, RepoFamily, RepoStatus, StepFailed, family_for, params_repo
from participants.repo.runner import ProgramFailed

log = logging.getLogger(__name__)

PUBLISH_PROCESS = "repo-publish"
ROLLBACK_PROCESS = "repo-rollback"


class _RepoStep(Participant):
    params: ClassVar[tuple[str, ...]] = ("repo",)

    def __init__(self) -> None:
        self.family: RepoFamily | None = None

    def check_params(self, params: Mapping[str, Any], config: Any) -> list[str]:
        problems = [f"unknown param {k!r} (expected {', '.join(self.params)})" for k in params if k not in self.params]
        repo = params.get("repo")
        if repo is None:
            problems.append("missing param 'repo' (a repository from participants: repo_publish: repositories)")
        elif not is_template(repo) and name_problem(repo):
            problems.append(str(name_problem(repo)))
        if isinstance(config, RepoConfig) and isinstance(repo, str) and not is_template(repo) \
                and repo not in config.repositories:
            problems.append(f"repo: unknown repository {repo!r}")
        wait = params.get("wait")
        if wait is not None and not isinstance(wait, bool):
            problems.append(f"wait: expected true or false, got {wait!r}")
        return problems

    async def setup(self, services: Services) -> None:
        self.family = family_for(services)
        await self.family.attach(self.name, services)

    async def shutdown(self) -> None:
        if self.name == "repo_publish" and self.family is not None:
            await self.family.shutdown()

    def _family(self) -> RepoFamily:
        if self.family is None:
            raise RuntimeError(f"{self.name}: used before setup")
        return self.family

    async def consume(self, workitem: Workitem) -> Reply:
        family = self._family()
        try:
            repo = params_repo(family.config, workitem.params)
            reply = await self.act(family, workitem, repo)
        except (StepFailed, ProgramFailed) as exc:
            reply = Reply.failed(str(exc))
        finally:
            if workitem.key not in family.waiting and not family.locks.queued(workitem.key):
                family.progress.pop(workitem.key, None)
        if reply.kind == "pending":
            return reply
        # the records of the programs it ran go in the answer's commit
        return dataclasses.replace(reply, ops=(*reply.ops, family.runner.forget(workitem.key)))

    async def act(self, family: RepoFamily, wi: Workitem, repo: Any) -> Reply:
        raise NotImplementedError

    async def cancel(self, workitem: Workitem) -> None:
        family = self._family()
        ops = family.cancel_key(workitem.key)
        if ops:
            await family.storage.write(*ops)
        await family.runner.stop(workitem.key)

    def progress(self, key: str) -> str | None:
        """What the step is doing now (rsync's progress, a freeze or lock wait), for ``show``."""
        return self.family.progress.get(key) if self.family else None


class RepoLock(_RepoStep):
    """Takes the repository's lock (FIFO), after any freeze."""

    name = "repo_lock"
    params = ("repo", "wait", "force")

    async def act(self, family: RepoFamily, wi: Workitem, repo: Any) -> Reply:
        if family.locks.holds(repo.name, wi.instance_id):
            return Reply.done(family.lock_fields(repo.name))
        # the repository's project decides who may publish it: an instance in another project
        # (launched without project=) would have been authorised against the wrong one
        project_of = family.services["repo_lock"].project_of
        project = await project_of(wi.instance_id) if project_of is not None else repo.project
        if project != repo.project:
            return Reply.failed(f"repository {repo.name} belongs to {repo.project}, not {project or 'no project'}: "
                                f"use `publish {repo.name}` (or launch with project={repo.project})")
        if wi.key in family.waiting or family.locks.queued(wi.key):
            return Reply.pending()
        if not await family.forced(wi, repo, wi.params.get("force")):
            until = family.frozen(repo)
            if until is not None:
                return await family.wait_freeze("lock", wi, repo, until)
        return await family.take_lock(wi, repo, wait=wi.params.get("wait", True) is not False)


class RepoSync(_RepoStep):
    """rsync into a new snapshot, linked against the published one."""

    name = "repo_sync"

    async def act(self, family: RepoFamily, wi: Workitem, repo: Any) -> Reply:
        return await family.sync(wi, repo)

    async def cancel(self, workitem: Workitem) -> None:
        await super().cancel(workitem)
        await self._family().discard_partial(workitem.key)


class RepoVerify(_RepoStep):
    name = "repo_verify"

    async def act(self, family: RepoFamily, wi: Workitem, repo: Any) -> Reply:
        return await family.verify(wi, repo)


class RepoSign(_RepoStep):
    name = "repo_sign"

    async def act(self, family: RepoFamily, wi: Workitem, repo: Any) -> Reply:
        return await family.sign(wi, repo)


class RepoPublish(_RepoStep):
    """Makes the synced snapshot current (one rename), then prunes.  Holds the
    repositories' configuration for every repository step."""

    name = "repo_publish"
    params = ("repo", "force")
    migrations: ClassVar[Sequence[str]] = MIGRATIONS

    def check_config(self, section: Section) -> RepoConfig:
        return check_section(section)

    async def act(self, family: RepoFamily, wi: Workitem, repo: Any) -> Reply:
        return await family.publish(wi, repo, wi.params.get("force"))

    # -- for the chat commands (bot/commands.py) ----------------------------------------

    def publish_request(self, repo: str, force: bool = False) -> tuple[str, dict[str, Any]]:
        """The process to launch for ``publish <repo> [force]`` and its fields;
        ValueError (one line) for a repository that is not configured."""
        family = self._family()
        family.config.repository(repo)
        return PUBLISH_PROCESS, {"repo": repo, "force": bool(force), "project": family.config.repositories[repo].project}

    def rollback_request(self, repo: str) -> tuple[str, dict[str, Any]]:
        family = self._family()
        family.config.repository(repo)
        return ROLLBACK_PROCESS, {"repo": repo, "project": family.config.repositories[repo].project}

    async def repos_status(self) -> list[RepoStatus]:
        """Each repository: last publish, state, lock holder and queue."""
        return await self._family().status()


class RepoRollback(_RepoStep):
    """Swaps ``current`` back to the snapshot published before it."""

    name = "repo_rollback"

    async def act(self, family: RepoFamily, wi: Workitem, repo: Any) -> Reply:
        return await family.rollback(wi, repo)

"""Users, their verified identities per network, and roles per project.

An identity is matched to a user only by what the server vouches for
(IRC services account on that network, XMPP bare JID, the local console).
IRC account names belong to one network (anyone may register "alice" on
another), so IRC identities are configured per network.  An IRC hostmask
pattern counts only where that user's entry explicitly allows it, and the
match is reported as weaker.

Who may do what (the one place it is decided; commands and approvals ask here):

* read (``ps``, ``show``, ``history``): instances of the projects, and their
  sub-projects, where the user holds any role; instances without a project:
  every known user; admins: everything.
* launch: one of the process's ``launch_roles`` on the project it runs in.
  That project is the process's own, or one of its sub-projects named at
  launch (``project=Foo:Bar``), never another.  A process without a project
  is a utility: ``project=`` puts it in the caller's project, where they need
  the launch role (and the instance is then that project's, read and managed
  by its people); without ``project=`` it runs in no project and needs the
  launch role on every project (``"*"``).
* cancel, retry: one of the process's launch roles on the instance's project
  (for an instance without a project: on every project).
* schedules: those whose process the user may launch.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

from bot.chat import (UNVERIFIED, VERIFIED_CONSOLE, VERIFIED_HOSTMASK, VERIFIED_JID, VERIFIED_MAIL_DOMAIN,
                      VERIFIED_MAIL_TOKEN, VERIFIED_SERVICES, Identity)
from engine.errors import Refusal

log = logging.getLogger(__name__)

ADMINS = "admins"          # the role that may do everything, everywhere
GLOBAL = "*"               # roles granted on every project


class NotAuthorised(Refusal):
    """The caller may not do this; logged as a warning with who asked."""


class WrongProject(Refusal):
    """A launch names a project the process may not run in."""


@dataclass(frozen=True)
class IrcIds:
    """A user's identities on one IRC network (account names are per network)."""

    accounts: tuple[str, ...] = ()
    hostmasks: tuple[str, ...] = ()         # explicit, weaker fallback


@dataclass(frozen=True)
class User:
    name: str
    irc: dict[str, IrcIds] = field(default_factory=dict)    # IRC network name -> identities there
    xmpp_jids: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    roles: dict[str, frozenset[str]] = field(default_factory=dict)   # project -> roles

    def roles_on(self, project: str | None) -> frozenset[str]:
        """Roles on ``project`` and every parent (``Foo:Bar`` inherits ``Foo``), plus global ones."""
        granted = set(self.roles.get(GLOBAL, ()))
        if project:
            parts = project.split(":")
            for i in range(1, len(parts) + 1):
                granted |= self.roles.get(":".join(parts[:i]), frozenset())
        return frozenset(granted)

    def has_role(self, role: str, project: str | None = None) -> bool:
        roles = self.roles_on(project)
        return ADMINS in roles or role in roles

    @property
    def reads_everything(self) -> bool:
        """Any role on every project ("*") lets a user read every project."""
        return bool(self.roles.get(GLOBAL))

    def readable_projects(self) -> tuple[str, ...] | None:
        """The projects whose instances (with their sub-projects') this user may
        read, besides those without a project; None: every project."""
        if self.reads_everything:
            return None
        return tuple(sorted(p for p, roles in self.roles.items() if roles))

    def may_read(self, project: str | None) -> bool:
        return project is None or bool(self.roles_on(project))


@dataclass(frozen=True)
class Caller:
    """The outcome of resolving an identity: who, and how sure we are."""

    identity: Identity
    user: User | None
    how: str

    def describe(self) -> str:
        ident = self.identity
        if self.user is None:
            if ident.account:
                return (f"{ident.handle} on {ident.network}: account {ident.account!r} "
                        f"({ident.verified_by}) is not a known user")
            return f"{ident.handle} on {ident.network}: not identified ({ident.verified_by})"
        roles = ", ".join(f"{p}: {'/'.join(sorted(r))}" for p, r in sorted(self.user.roles.items()))
        return (f"{ident.handle} on {ident.network} is {self.user.name}, verified by {self.how}"
                f"; roles: {roles or 'none'}")


class Directory:
    """Resolves identities to users.  Built from users.yaml by ``bot.config``."""

    def __init__(self, users: list[User]) -> None:
        self.users = {u.name: u for u in users}
        self._irc = {(net, a.casefold()): u for u in users for net, ids in u.irc.items() for a in ids.accounts}
        self._xmpp = {j.lower(): u for u in users for j in u.xmpp_jids}

    def user(self, name: str) -> User | None:
        """The user called ``name`` (``engine.participants.UserDirectory``)."""
        return self.users.get(name)

    def holders(self, role: str, project: str | None = None) -> list[User]:
        """Users holding ``role`` on ``project`` (inherited from a parent project
        or ``"*"`` counts; being an admin does not), by name."""
        return [u for _, u in sorted(self.users.items()) if role in u.roles_on(project)]

    def resolve(self, ident: Identity) -> Caller:
        if ident.protocol == "console":
            user = self.users.get(ident.account or "")
            return Caller(ident, user, VERIFIED_CONSOLE if user else UNVERIFIED)
        if ident.protocol == "irc":
            if ident.account and ident.verified_by == VERIFIED_SERVICES:
                user = self._irc.get((ident.network, ident.account.casefold()))
                if user:
                    return Caller(ident, user, VERIFIED_SERVICES)
            if ident.hostmask:
                for user in self.users.values():
                    ids = user.irc.get(ident.network)
                    if ids and any(fnmatch.fnmatchcase(ident.hostmask.lower(), pat.lower())
                                   for pat in ids.hostmasks):
                        return Caller(ident, user, VERIFIED_HOSTMASK)
            return Caller(ident, None, ident.verified_by)
        if ident.protocol == "email" and ident.account and ident.verified_by in (VERIFIED_MAIL_TOKEN,
                                                                                 VERIFIED_MAIL_DOMAIN):
            # the email front-end identified the user (bot.transports.email.inbound.identify):
            # the account is their name, and the mail came from one of their addresses
            user = self.users.get(ident.account)
            if user is not None and ident.handle.lower() in {e.lower() for e in user.emails}:
                return Caller(ident, user, ident.verified_by)
            return Caller(ident, None, UNVERIFIED)
        if ident.protocol == "xmpp" and ident.account and ident.verified_by == VERIFIED_JID:
            user = self._xmpp.get(ident.account.lower())
            return Caller(ident, user, VERIFIED_JID if user else ident.verified_by)
        return Caller(ident, None, ident.verified_by)


# -- authorisation: the rules in the module docstring ---------------------------------

def _roles_text(roles: tuple[str, ...]) -> str:
    return " or ".join(map(repr, roles))


def authorise_launch(user: User, process: str, process_project: str | None,
                     launch_roles: tuple[str, ...], project: str | None) -> None:
    """May ``user`` launch ``process`` into ``project`` (the one named at launch,
    or the process's own)?  Raises NotAuthorised, or Refusal for a project the
    process may not move to."""
    if process_project and project != process_project and not (project or "").startswith(process_project + ":"):
        # roles are checked on the project named: moving a process to another one would let
        # a release manager of any project launch it
        raise WrongProject(f"{process} belongs to project {process_project}; project= may name only it "
                      "or one of its sub-projects")
    roles = launch_roles or (ADMINS,)
    if not any(user.has_role(role, project) for role in roles):
        raise NotAuthorised(f"not authorised: launching {process} needs role {_roles_text(roles)}"
                            + (f" on {project}" if project else ""))


def authorise_manage(user: User, action: str, instance_id: int, launch_roles: tuple[str, ...],
                     project: str | None) -> None:
    """cancel/retry (and, next, answering for an instance): a launch role of its
    process on the instance's project."""
    roles = launch_roles or (ADMINS,)
    if not any(user.has_role(role, project) for role in roles):
        raise NotAuthorised(f"not authorised: {action} #{instance_id} needs role {_roles_text(roles)}"
                            + (f" on {project}" if project else ""))


def authorise_read(user: User, instance_id: int, project: str | None) -> None:
    if not user.may_read(project):
        # the same words as for an id that does not exist: a refusal must not confirm
        # that another project's instance is there
        raise NotAuthorised(f"no instance #{instance_id}")

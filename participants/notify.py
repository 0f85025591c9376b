"""``notify``: a step that sends a message, through the durable outbox.

    - participant: notify
      params:
        to: ["irc:libera:#releases", "email:team@example.org", "user:alice"]
        message: "{{ repo }} published as {{ snapshot }}"      # the chat line
        subject: "[{{ repo }}] published"                        # mail only (default: the message)
        body: "..."                                              # mail only (default: the message)

or, instead of message/subject/body, ``template: publish-done``: a named
template from bot.yaml, rendered by this step over the instance's fields
(and ``instance``: id, process, step), in the same sandbox as the
definitions::

    participants:
      notify:
        templates:
          publish-done:
            chat: "{{ repo }} published ({{ instance.process }} #{{ instance.id }})"
            subject: "[release] {{ repo }} published"
            body: |
              ...

The step is done when its messages are written to the outbox (in the commit
that completes the step), not when they are delivered: delivery is the
outbox's job, and ``outbox`` shows it.  A named template that fails to render
(a field missing in this instance) falls back to a plain line about the step,
and the failure is logged.  Destinations are checked with the configuration
(``check``); one made by a template is checked when the step runs, and a bad
one fails the step, naming it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from engine.configkit import Section, message_templates
from engine.errors import ReleasebotError
from engine.participants import Participant, Reply, Services, Workitem
from engine.templating import MessageTemplate, TemplateProblem

log = logging.getLogger(__name__)

PARAMS = ("to", "message", "subject", "body", "template")
MAX_CHAT = 4000          # characters of a chat message: longer ones are cut (mail keeps the whole body)


@dataclass(frozen=True)
class NotifyConfig:
    templates: Mapping[str, MessageTemplate] = field(default_factory=dict)


class Notify(Participant):
    name = "notify"
    destination_params: ClassVar[tuple[str, ...]] = ("to",)

    def __init__(self) -> None:
        self.services: Services | None = None

    def check_config(self, section: Section) -> NotifyConfig:
        section.check_keys(("templates",))
        return NotifyConfig(message_templates(section, "templates", "template name"))

    def check_params(self, params: Mapping[str, Any], config: Any) -> list[str]:
        problems = [f"unknown param {k!r} (expected {', '.join(PARAMS)})" for k in params if k not in PARAMS]
        to = params.get("to")
        if not to or not (isinstance(to, str) or (isinstance(to, list) and all(isinstance(t, str) for t in to))):
            problems.append("to: expected a destination or a list of them (irc:<network>:#channel, "
                            "xmpp:<network>:room@service, email:<address>, user:<name>)")
        named = params.get("template")
        inline = [k for k in ("message", "subject", "body") if k in params]
        if named is not None and inline:
            problems.append(f"template and {', '.join(inline)} are exclusive: a named template has its own text")
        elif named is None and "message" not in params:
            problems.append("missing 'message' (the chat line) or 'template' (a template named in bot.yaml)")
        if named is not None:
            templates = config.templates if isinstance(config, NotifyConfig) else {}
            if not isinstance(named, str) or named not in templates:
                problems.append(f"template: unknown template {named!r} (bot.yaml participants notify templates: "
                                f"{', '.join(sorted(templates)) or 'none'})")
        for key in ("message", "subject", "body"):
            if key in params and not isinstance(params[key], str):
                problems.append(f"{key}: expected text")
        return problems

    async def setup(self, services: Services) -> None:
        self.services = services

    async def consume(self, workitem: Workitem) -> Reply:
        services = self.services
        assert services is not None
        if services.outbox is None:
            return Reply.failed("notify: this bot has no outbox")
        params = workitem.params
        to = params.get("to")
        to_list = [to] if isinstance(to, str) else list(to or [])
        text, subject, body = self._text(workitem, services.config)
        if len(text) > MAX_CHAT:
            text = text[:MAX_CHAT - 40].rstrip() + f" ... ({len(text)} characters; the mail has all)"
        project = workitem.fields.get("project")
        try:
            ops = services.outbox.rows(f"notify {workitem.key}", to_list, text, subject=subject, body=body,
                                       origin=f"#{workitem.instance_id} {workitem.step}",
                                       project=project if isinstance(project, str) else None,
                                       instance=workitem.instance_id)
        except ReleasebotError as exc:        # a destination made by a template that cannot work
            return Reply.failed(f"notify: {exc}")
        return Reply.done({"notified": to_list}, ops=ops)

    def _text(self, workitem: Workitem, config: Any) -> tuple[str, str, str]:
        params = workitem.params
        named = params.get("template")
        if named is None:
            message = str(params.get("message", ""))
            return message, str(params.get("subject") or message.split("\n", 1)[0]), str(params.get("body") or message)
        template = config.templates[named] if isinstance(config, NotifyConfig) and named in config.templates else None
        scope = {**workitem.fields, "instance": {"id": workitem.instance_id, "process": workitem.process,
                                                 "step": workitem.step}}
        try:
            if template is None:
                raise TemplateProblem(f"no template {named!r} in bot.yaml")
            return template.render(scope)
        except TemplateProblem as exc:
            log.warning("#%d %s: notify template %s failed (%s); sending a plain message", workitem.instance_id,
                        workitem.step, named, exc)
            plain = f"{workitem.process} #{workitem.instance_id}: {workitem.step}"
            return plain, plain, plain + f"\n\n(template {named} could not be rendered: {exc})"


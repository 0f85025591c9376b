"""Notifiers: who is told what, where (next: the durable outbox, per-project
routes and per-user subscriptions).

A notifier is *when* (a filter over the engine's events: project, event
kind, subscriber), *what* (a template) and *where* (a sink that only sends,
through the durable outbox).  Nothing lives here yet: today the bot only
answers whoever typed a command.  See docs/architecture.md.
"""

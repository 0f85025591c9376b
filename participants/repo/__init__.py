"""Publishing package repositories: lock, sync, verify, sign, atomic swap, rollback.

Configuration (``participants: {repo_publish: {repositories: ...}}``) in
``config.py``; the shared state and the work in ``family.py``; the steps in
``steps.py``; rsync at the destinations in ``transfer.py``; programs run under
the command participant's supervisor (``runner.py``).
"""
from participants.repo.steps import RepoLock, RepoPublish, RepoRollback, RepoSign, RepoSync, RepoVerify

__all__ = ["RepoLock", "RepoPublish", "RepoRollback", "RepoSign", "RepoSync", "RepoVerify"]

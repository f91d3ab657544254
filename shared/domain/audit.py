"""The audit trail's vocabulary: one event per step in a request's life (docs/security.md,
"What the audit trail records")."""

RECEIVED = "Received"
REJECTED = "Rejected"
QUEUED = "Queued"
REQUEUED = "Requeued"  # an accepted request never picked up got its message again
DUPLICATE = "Duplicate"
RESOLVED = "Resolved"
THROTTLED = "Throttled"
RETRYING = "Retrying"
SUBMITTED = "Submitted"
STATUS_CHANGED = "StatusChanged"
FOLLOW_UP_STOPPED = "FollowUpStopped"
FAILED = "Failed"
CANCELLED = "Cancelled"
HELD = "Held"
RELEASED = "Released"
RELEASE_UNDONE = "ReleaseUndone"  # the released request could not be queued: held again
EXPIRED = "Expired"
PRECHECK = "Prechecked"
DRY_RUN = "DryRun"
TAGGED = "Tagged"
NOTIFIED = "Notified"

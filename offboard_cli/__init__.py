"""`scripts/offboard`: the operator command for the Defender offboarding service.

It submits a file of devices (CSV or a plain list), follows the requests to their end,
lists and inspects requests, shows and releases held ones, and reads the audit trail. It
talks to the service over HTTP only (the routes in docs/api.md); from the
app it borrows nothing but the pure identifier rules of `shared.domain`, so it recognises a
machine id, an Entra device id or a DNS name exactly as the service will. Not deployed
(`.funcignore`).
"""

__version__ = "1.0.0"

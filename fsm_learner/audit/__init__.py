"""The audit log: writing it during a fit, and replaying it afterwards to verify a run."""

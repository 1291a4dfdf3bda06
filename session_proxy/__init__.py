"""Session proxy and session manager (persistent sessions, levels L1 and L2).

See ../shared/ARCHITECTURE.md; built in a later issue.
"""

"""The cluster daemons (registry, orchestrator, gateway, worker) and their supervisor."""

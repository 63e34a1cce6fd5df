"""Plumbing between roles: trajectory queue, rollout coordinator, weight broadcast."""

"""The edge agent: presence, info reports, task discovery, bundle download, policies, running tasks.

The agent process never imports torch or Flower: they live in the task's child process.
"""

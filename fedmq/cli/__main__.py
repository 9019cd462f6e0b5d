"""``python -m fedmq.cli``: the same as the ``fedmq`` command."""

from fedmq.cli import run

run()

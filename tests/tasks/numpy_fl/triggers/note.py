"""A trigger: records its arguments where the test can see them and reports through the reporter."""
import os
import sys
from pathlib import Path

from fedmq.ftdl import TaskReporter

Path("trigger-note.txt").write_text(" ".join(sys.argv[1:]))
TaskReporter.get().send_info(trigger_saw=sys.argv[1:], task=os.environ.get("FEDMQ_TASK_ID"))
print("note trigger ran with", sys.argv[1:])

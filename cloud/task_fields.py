"""The bounds of a task's fields, shared by every way a task is described: the ``tasks`` RPC
(cloud/task_service.py) and the fleet file (cloud/fleet_file.py).  A module of its own, light
to import: the CLI validates a fleet file with them before it connects."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

MAX_ARGS_BYTES = 16 * 1024
Tag = Annotated[str, Field(min_length=1, max_length=64)]
Tags = Annotated[list[Tag], Field(max_length=16)]
Priority = Annotated[int, Field(ge=-1000, le=1000)]
Name = Annotated[str, Field(min_length=1, max_length=128)]
CriteriaText = Annotated[str, Field(max_length=4000)]
SelectionChoice = Literal["cloud", "device"]  # SelectionMode, as the RPC layer (strict) reads text

"""Publishing a lorafleet task: what the leader needs of Celery, and the one way a message goes out.

The leader (`scheduler/loop.py` for RL batches, `scheduler/tinker/dispatch.py` for client ops and
samples) never imports the tasks (they live with torch in `workers/`): it publishes them by name.
In production the sender is `celery_config.make_sender(url)`, a task-less Celery app with
lorafleet's options; tests inject a recorder with the same `send_task`.

Every lorafleet task takes one argument, its message's JSON form (`messages.py`), and nothing else:
no kwargs, no ETA, no time limit. That is the message the broker screen (`screen.py`) accepts, so
every publish goes through `send_message`, which writes exactly that call.
"""

from __future__ import annotations

from typing import Any, Protocol

from lorafleet.common.messaging.messages import BatchMessage, SampleMessage


class TaskSender(Protocol):
    """What the scheduler needs of Celery: publish a task by name to a queue."""

    def send_task(self, name: str, args: list[Any], queue: str) -> Any: ...


def send_message(sender: TaskSender, task: str, message: BatchMessage | SampleMessage, queue: str) -> None:
    """Publish `message` as the one argument of the task named `task` on `queue`."""
    sender.send_task(task, args=[message.model_dump(mode="json")], queue=queue)

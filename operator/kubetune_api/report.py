"""What the trainer tells the operator, in the same shapes as FineTuneJob.status.

The trainer serves a `TrainerReport` as JSON on `GET /progress` (next to `/metrics`) while it runs, and
writes the final one to its termination message (`/dev/termination-log`, which kubelet keeps in the pod's
status after exit, max 4096 bytes). So the last values survive the pod, and a failure's reason reaches the
FineTuneJob's conditions without the operator reading logs.
"""

from __future__ import annotations

import json
from typing import Optional

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from .common import Model
from .finetunejob import Artifacts, Forgetting, Progress

TERMINATION_MESSAGE_LIMIT = 4096


class TrainerReport(Model):
    # Ignore unknown keys: an older operator must still read a newer trainer's report.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    state: str = Field("running", description="running | succeeded | failed | preempted")
    reason: Optional[str] = Field(None, description="CamelCase reason when finished (e.g. InvalidDataset).")
    message: Optional[str] = Field(None, description="Human-readable explanation, naming the field/file.")
    field: Optional[str] = Field(None, description="The spec field or file at fault, when known.")
    exit_code: Optional[int] = None
    progress: Optional[Progress] = None
    forgetting: Optional[Forgetting] = None
    artifacts: Optional[Artifacts] = None

    def to_termination_message(self) -> str:
        """Compact JSON under kubelet's 4096-byte cap; the message is shortened first if needed."""
        data = self.to_k8s()
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and data.get("message"):
            over = len(text.encode()) - TERMINATION_MESSAGE_LIMIT + 16
            data["message"] = data["message"][: max(0, len(data["message"]) - over)] + "..."
            text = json.dumps(data, separators=(",", ":"))
        return text[:TERMINATION_MESSAGE_LIMIT]

    @classmethod
    def parse(cls, text: str | None) -> "TrainerReport | None":
        """Parse a termination message; None when it is not one of ours (e.g. a plain-text crash)."""
        if not text:
            return None
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, TypeError):
            return None

"""Conversation messages and the role every token is attributed to."""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict


class Role(IntEnum):
    """Who a token belongs to. TEMPLATE marks chat-template structure outside any message;
    TOOL marks what a tool returned (text from outside the conversation, like a user's)."""

    TEMPLATE = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    TOOL = 4

    @property
    def label(self) -> str:
        return self.name.lower()


class Message(BaseModel):
    """One chat message, as the OpenAI-style APIs and chat templates know it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str

    @property
    def token_role(self) -> Role:
        return Role[self.role.upper()]

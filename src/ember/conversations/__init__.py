"""Conversations kept by ember: the store (SQLite), context strategies, and the turn service every way in uses."""

from ember.conversations.records import Conversation, ConversationNotFoundError, StoredMessage
from ember.conversations.store import ConversationStore, NewMessage

__all__ = ["Conversation", "ConversationNotFoundError", "ConversationStore", "NewMessage", "StoredMessage"]

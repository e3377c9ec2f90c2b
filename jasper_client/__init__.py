"""The MP client library: subscribe to a Jasper stream and read its framed feed
(docs/mp-feed.md; README, "Consuming the feed")."""

from jasper_client.feed import (
    Event,
    FeedReader,
    Gap,
    Late,
    Malformed,
    Message,
    MpClient,
    SubscriptionError,
)

__all__ = [
    "Event",
    "FeedReader",
    "Gap",
    "Late",
    "Malformed",
    "Message",
    "MpClient",
    "SubscriptionError",
]

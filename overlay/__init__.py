"""Data-plane daemons on asyncio: publisher, relays, receivers, and the pieces they share."""

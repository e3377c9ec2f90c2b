"""Jasper controller: FastAPI service for nodes, streams, MPs, subscriptions and tree plans."""

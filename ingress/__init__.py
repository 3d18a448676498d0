"""The aiohttp service that takes Flireo webhooks and makes each report durable on Kafka."""

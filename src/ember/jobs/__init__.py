"""Durable work: batch files and batches, scheduled jobs, and the RabbitMQ worker."""
